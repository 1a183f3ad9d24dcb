"""What `tinyformers explain` shows: a prompt's tokens, the next-token ranking, the logit lens
and the attention patterns, as terminal tables (tables.py), PNG heat maps (png.py) and one
self-contained HTML page (html.py). The numbers are computed once, in data.py.

matplotlib is imported by png.py only, so the command starts fast when no --out is given.
"""

from tinyformers.explain.data import (
    Explanation,
    explain,
    head_scores,
    most_interesting_head,
    piece_label,
)

__all__ = ["Explanation", "explain", "head_scores", "most_interesting_head", "piece_label"]
