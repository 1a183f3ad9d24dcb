"""Attention heat maps as PNG files: one per layer, its heads in a grid, pieces on both axes.

Speed: 30 layers x 9 heads drawn as 30 full matplotlib figures take ~12 s, mostly laying out
and rasterising the same tick labels again. We draw one figure once (axes, labels, colour
bar, head titles), keep its pixels, and for each layer paint only the heat maps and the
title over a copy of them (matplotlib's blitting): ~0.1 s a layer.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tinyformers.explain.data import Explanation
from tinyformers.explain.tables import cut

FONT = 7  # points, for the token pieces on the axes
PANEL_MAX = 5.0  # inches, the side of one head's heat map
MASKED = "#dddddd"  # the cells a causal model never attends to (later tokens)


def write_pngs(ex: Explanation, out: Path) -> list[Path]:
    """`out/layer_NN.png` for every layer in `ex.patterns`; the paths written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.image import imsave

    fig, images, title = layer_figure(ex)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # everything but the animated heat maps and title
    background = canvas.copy_from_bbox(fig.bbox)
    causal = np.tril(np.ones((len(ex.ids), len(ex.ids)), dtype=bool))  # (T, T) query >= key
    # PNG compression releases the GIL: one thread compresses while the next layer draws.
    with ThreadPoolExecutor(max_workers=1) as pool:
        saved = []
        for layer, pattern in ex.patterns.items():
            canvas.restore_region(background)
            for head, image in enumerate(images):
                image.set_data(np.where(causal, pattern[head].numpy(), np.nan))  # NaN: MASKED
                image.axes.draw_artist(image)
            title.set_text(layer_title(ex, layer))
            fig.draw_artist(title)
            rgb = np.array(canvas.buffer_rgba())[..., :3]  # a copy; no alpha: 20% less to pack
            path = out / f"layer_{layer:02d}.png"
            saved.append((path, pool.submit(imsave, path, rgb, pil_kwargs={"compress_level": 1})))
    for _, done in saved:
        done.result()  # raises what a save raised (a full disk)
    return [path for path, _ in saved]


def layer_figure(ex: Explanation):
    """The figure every layer shares: (figure, one image per head, the title), the images and
    title animated so that `canvas.draw()` leaves them out."""
    import matplotlib as mpl
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    n_head, T = next(iter(ex.patterns.values())).shape[:2]
    cols = math.ceil(math.sqrt(n_head))
    rows = math.ceil(n_head / cols)
    step = max(1, math.ceil(T * FONT * 1.5 / 72 / PANEL_MAX))  # every piece while they fit
    ticks = range(0, T, step)
    labels = [f"{cut(ex.pieces[i], 12)} {i}" for i in ticks]
    # Margins in inches, from the longest label: matplotlib's constrained layout would
    # measure every label itself, a third of the drawing time.
    panel = min(max(0.15 * T, 1.8), PANEL_MAX)  # ~0.15 inch per token keeps labels apart
    label = max(map(len, labels)) * FONT * 0.6 / 72 + 0.1
    left, bottom, top, right, gap, vgap = label + 0.4, label + 0.4, 0.75, 1.3, 0.2, 0.35
    width = left + cols * panel + (cols - 1) * gap + right
    height = bottom + rows * panel + (rows - 1) * vgap + top
    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=gap / panel,
        hspace=vgap / panel,
    )
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    # Square-root scale: the first token often takes most of the attention, and on a linear
    # scale the weights that tell heads apart (0.01-0.2) would all look black.
    norm = PowerNorm(0.5, vmin=0.0, vmax=1.0)
    cmap = mpl.colormaps["viridis"].with_extremes(bad=MASKED)
    images = []
    for head, ax in enumerate(axes):
        ax.set_visible(head < n_head)
        images.append(ax.imshow(np.zeros((T, T)), norm=norm, cmap=cmap, interpolation="nearest"))
        images[-1].set_animated(True)
        ax.set_title(f"head {head}", fontsize=8)
        ax.tick_params(labelsize=FONT)
        ax.tick_params("x", labelrotation=90)
    axes[0].set_xticks(ticks, labels)  # the axes are shared: this labels them all
    axes[0].set_yticks(ticks, labels)
    fig.supxlabel(f"key: the token attended to ({MASKED_NOTE})", fontsize=9, y=0.1 / height)
    fig.supylabel("query: the token attending", fontsize=9, x=0.1 / width)
    bar_box = [1 - (right - 0.25) / width, 0.2, 0.2 / width, 0.6]  # x, y, width, height
    bar = fig.colorbar(images[0], cax=fig.add_axes(bar_box), label=COLOUR_SCALE)
    bar.set_ticks([0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1])
    title_y = 1 - 0.15 / height  # its top 0.15 inch below the edge
    title = fig.suptitle(layer_title(ex, ex.n_layer - 1), fontsize=11, y=title_y, animated=True)
    return fig, images[:n_head], title


MASKED_NOTE = "grey: a later token, masked"
# The colour bar's label: the ticks alone would not say why 0.25 sits half-way up.
COLOUR_SCALE = "attention weight (colour: square-root scale)"


def layer_title(ex: Explanation, layer: int) -> str:
    return f"{ex.model_name}: attention of layer {layer} (layers 0-{ex.n_layer - 1})"
