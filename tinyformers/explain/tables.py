"""The terminal view: plain-text tables, as wide as the terminal, wider grids cut into blocks.

Pieces are cut to a fixed width (with …) so that 30 layers x 20 positions stay a grid a
person can scan; the token list above the tables shows every piece whole.
"""

from __future__ import annotations

from tinyformers.explain.data import Explanation

LENS_PIECE = 8  # characters of a logit-lens token shown in a cell


def cut(text: str, width: int) -> str:
    """`text` in at most `width` characters, the cut marked with …. Example: cut("abcdef", 4)
    == "abc…"."""
    return text if len(text) <= width else text[: width - 1] + "…"


def token_table(ex: Explanation) -> str:
    lines = [f"tokens: {len(ex.ids)} (␣ is a space, ↵ a newline)", "  pos      id  piece"]
    lines += [
        f"{pos:>5}  {i:>6}  {piece}"
        for pos, (i, piece) in enumerate(zip(ex.ids, ex.pieces, strict=True))
    ]
    return "\n".join(lines)


def next_token_table(ex: Explanation) -> str:
    """rank, token, probability, logit of the top-k next tokens after the last position."""
    lines = [
        f"next token after {ex.pieces[-1]!r} (position {len(ex.ids) - 1}): top {len(ex.next_ids)}",
        "  rank  token                 id  probability     logit",
    ]
    rows = zip(ex.next_pieces, ex.next_ids, ex.next_probs, ex.next_logits, strict=True)
    for rank, (piece, i, p, logit) in enumerate(rows, start=1):
        lines.append(f"{rank:>6}  {cut(piece, 16):<16}  {i:>6}  {p:>11.4g}  {logit:>8.3f}")
    return "\n".join(lines)


def lens_table(ex: Explanation, width: int) -> str:
    """Layer x position: the logit lens's top-1 next token and its probability in %."""
    head = (
        f"logit lens: the most likely next token (and its probability in %) at each position,\n"
        f"read from the residual stream after `layer` blocks (0: the embeddings only, "
        f"{ex.n_layer}: the model's output)"
    )
    cells = [
        [
            f"{cut(piece, LENS_PIECE):<{LENS_PIECE}} {round(100 * p):>3}"
            for piece, p in zip(*row, strict=True)
        ]
        for row in zip(ex.lens_pieces, ex.lens_probs, strict=True)
    ]
    rows = [str(layer) for layer in range(ex.n_layer + 1)]
    return head + "\n" + grid("layer", rows, ex.pieces, cells, width)


def pattern_table(ex: Explanation, layer: int, head: int, width: int) -> str:
    """One head's attention weights in %: a row per query token, a column per key position."""
    pattern = ex.patterns[layer][head]  # (T, T)
    T = len(ex.ids)
    cells = [
        [f"{round(100 * pattern[q, k].item()):>3}" if k <= q else "" for k in range(T)]
        for q in range(T)
    ]
    rows = [f"{q:>3} {cut(piece, 10)}" for q, piece in enumerate(ex.pieces)]
    head_line = (
        f"attention of layer {layer}, head {head} in %: row = the token attending (query), "
        f"column = the position it attends to (key); each row sums to 100"
    )
    return head_line + "\n" + grid("query / key", rows, None, cells, width)


def grid(
    corner: str, rows: list[str], columns: list[str] | None, cells: list[list[str]], width: int
) -> str:
    """A table of `cells` [row][column] under a line of positions and one of `columns` (if
    given), cut into blocks of columns that fit `width` characters."""
    label_width = max(len(corner), *map(len, rows))
    cell_width = max(3, *(len(c) for row in cells for c in row))
    per_block = max(1, (width - label_width) // (cell_width + 2))
    blocks = []
    n_columns = len(cells[0])
    for start in range(0, n_columns, per_block):
        span = range(start, min(start + per_block, n_columns))
        header = [("pos" if columns else corner, [str(c) for c in span])]
        if columns:
            header.append((corner, [cut(columns[c], cell_width) for c in span]))
        lines = [
            f"{label:<{label_width}}" + "".join(f"  {text:<{cell_width}}" for text in texts)
            for label, texts in header
        ]
        for label, row in zip(rows, cells, strict=True):
            line = f"{label:<{label_width}}" + "".join(f"  {row[c]:<{cell_width}}" for c in span)
            lines.append(line)
        blocks.append("\n".join(line.rstrip() for line in lines))
    return "\n\n".join(blocks)
