"""Where each view of the lab is explained: a chapter of the course and the lines of our code
that compute it, both served by the lab itself so they open offline.

A line is found by the text it holds, each time the page asks, so a link stays right while
the files change (tools/relink.py does the same for the docs).
"""

from __future__ import annotations

import html
import inspect
import re
from pathlib import Path

from torch import nn

from tinyformers.models import architecture_of

PACKAGE = Path(__file__).resolve().parents[1]  # tinyformers/
COURSE = PACKAGE.parent / "docs" / "learn"  # in a checkout; a wheel carries the package only
MODEL = "MODEL"  # stands for the file of the model's architecture (models/gpt2.py, ...)

# view -> the chapters of the course (docs/learn/) that explain it
CHAPTERS = {
    "tokens": ["02-tokens-and-embeddings.md"],
    "embeddings": ["02-tokens-and-embeddings.md"],
    "attention": ["03-attention.md"],
    "ablation": ["08-circuits.md"],
    "next": ["04-softmax-and-temperature.md", "06-unembedding.md"],
    "lens": ["08-circuits.md", "06-unembedding.md"],
}
# view -> (file under tinyformers/, text on the line that computes it)
CODE = {
    "tokens": [("tokenizers/__init__.py", "def prompt_ids(")],
    "embeddings": [(MODEL, 'self.hook("hook_embed"')],
    "attention": [(MODEL, "z = attention(q, k, v, mask")],  # the pattern: models/attention.py
    "ablation": [(MODEL, 'self.hook("hook_z"'), ("lab/compute.py", "def zero_head(")],
    "next": [
        (MODEL, "def unembed("),
        ("generation/sampling.py", "logits = logits / params.temperature"),
    ],
    "lens": [("lens.py", "def logit_lens(")],
}


def view_links(net: nn.Module) -> dict[str, dict[str, list[list[str]]]]:
    """{view: {"course": [[label, url], ...], "code": [[file:line, url], ...]}}; a line whose
    text is no longer in its file is left out rather than pointing at the wrong place."""
    model_file = Path(inspect.getsourcefile(architecture_of(net))).resolve().relative_to(PACKAGE)
    links = {}
    for view, chapters in CHAPTERS.items():
        code = []
        for name, text in CODE[view]:
            path = f"tinyformers/{model_file if name == MODEL else name}"
            if line := find_line(PACKAGE.parent / path, text):
                code.append([f"{path}:{line}", f"/lab/code/{path}#L{line}"])
        course = [[f"docs/learn/{c}", f"/lab/learn/{c}"] for c in chapters]
        links[view] = {"course": course, "code": code}
    return links


def find_line(path: Path, text: str) -> int | None:
    """The 1-based number of the first line of `path` that holds `text`."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if text in line:
            return number
    return None


def source_page(relative: str) -> str | None:
    """One of our .py files as a page, a numbered anchor per line (#L12 lights it up); None
    for anything that is not a .py file inside the package."""
    path = (PACKAGE.parent / relative).resolve()
    if path.suffix != ".py" or not path.is_relative_to(PACKAGE) or not path.is_file():
        return None
    rows = "".join(
        f'<tr id="L{n}"><td><a href="#L{n}">{n}</a></td><td>{html.escape(line)}</td></tr>\n'
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
    )
    return SOURCE_PAGE.replace("{{title}}", html.escape(relative)).replace("{{rows}}", rows)


def chapter(name: str) -> str | None:
    """A chapter of the course as its Markdown text, when this is a checkout that has it."""
    if not re.fullmatch(r"\d\d-[a-z0-9-]+\.md", name) or not (COURSE / name).is_file():
        return None
    return (COURSE / name).read_text(encoding="utf-8")


SOURCE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<link rel="stylesheet" href="/lab/static/lab.css"></head>
<body class="source"><h1>{{title}}</h1>
<table>
{{rows}}</table>
</body></html>
"""
