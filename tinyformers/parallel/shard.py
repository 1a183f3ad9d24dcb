"""One rank's shard of a model: its config and the slice of each weight it reads.

Megatron-LM's split (Shoeybi et al., 2019), as gpt-fast's tp.py does it:
    column-parallel  q, k, v, gate, up (GPT-2: c_attn, c_fc): output rows split, so each rank
                     computes whole heads (GQA kept: query and KV heads split alike) and a
                     slice of the MLP's hidden units, with no communication;
    row-parallel     o_proj, down_proj (GPT-2: both c_proj): input columns split, so each rank
                     holds a partial sum of the output, and one all-reduce adds them; the bias
                     is kept on rank 0 only, so it is added once;
    vocab-parallel   embeddings and lm_head: rows split by token id (ceil(V / world) each,
                     the last rank the rest), so the largest matrix of a small model is not
                     copied on every rank; a tied pair stays tied, sharing each rank's rows;
    replicated       norms, position embeddings: a few vectors.
The rank's config says the same in the model's own terms (heads / world, hidden units / world,
vocab / world rounded up, head_dim kept), so the unchanged model class builds the shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from tinyformers.errors import TinyformersError

COLUMN_PARALLEL = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_fc"}
ROW_PARALLEL = {"o_proj", "down_proj", "c_proj"}
STACKED = {"c_attn": 3}  # GPT-2: q, k and v stacked by rows in one matrix, each split alike
VOCAB_PARALLEL = {"wte", "embed_tokens", "lm_head"}

# Config fields that count heads or hidden units (each split by the world size), by family.
SPLIT_FIELDS = ("n_head", "num_attention_heads", "num_key_value_heads", "n_inner")
SPLIT_FIELDS += ("intermediate_size",)

CHUNK = 16 * 2**20  # bytes of a file read between two drops of its pages
Read = Callable[[int, int, int], Tensor]  # (dim, start, stop) -> that slice of a weight


@dataclass
class Shard:
    """Rank `rank` of `world`. Example: Shard(1, 3).local_config(smollm2) has 3 heads of 9."""

    rank: int
    world: int
    model_config: object = None  # the whole model's config, kept by local_config

    def local_config(self, config):
        """The config of this rank's shard; an error naming both numbers when a head or
        hidden-unit count does not divide by the world size."""
        self.model_config = config
        changes = {}
        if hasattr(config, "n_embd"):  # GPT-2: widths follow n_head * head_dim once split
            changes["head_dim"] = config.head_dim or config.n_embd // config.n_head
            changes["n_inner"] = config.n_inner or 4 * config.n_embd
        else:  # Llama: head_dim defaults to hidden_size // num_attention_heads, kept whole
            changes["head_dim"] = (
                config.head_dim or config.hidden_size // config.num_attention_heads
            )
        for field in SPLIT_FIELDS:
            count = changes.get(field, getattr(config, field, None))
            if count is None:
                continue
            if count % self.world:
                raise TinyformersError(
                    f"tensor parallel: {field} {count} does not divide by the world size "
                    f"{self.world}; run on a world size that divides it"
                )
            changes[field] = count // self.world
        start, stop = self.vocab_span(config.vocab_size)
        changes["vocab_size"] = stop - start
        return dataclasses.replace(config, **changes)

    def vocab_span(self, vocab_size: int) -> tuple[int, int]:
        """The token ids whose rows this rank holds: ceil(V / world) of them, fewer on the last."""
        rows = -(-vocab_size // self.world)
        start = min(self.rank * rows, vocab_size)
        return start, min(start + rows, vocab_size)

    def take(self, name: str, shape: tuple[int, ...], read: Read) -> Tensor:
        """This rank's part of weight `name` (our names) of full `shape`, read by `read`."""
        module, kind = name.split(".")[-2:]  # "layers.3.self_attn.q_proj.weight": q_proj, weight
        if module in COLUMN_PARALLEL:
            return read(0, *self._span(shape[0]))
        if module in STACKED:  # the rank's rows of q, of k and of v, stacked again
            part = shape[0] // STACKED[module]
            spans = (self._span(part, offset=i * part) for i in range(STACKED[module]))
            return torch.cat([read(0, start, stop) for start, stop in spans])
        if module in ROW_PARALLEL and kind == "weight":
            return read(1, *self._span(shape[1]))
        if module in ROW_PARALLEL:  # the bias: added once, after the all-reduce
            w = read(0, 0, shape[0])
            return w if self.rank == 0 else torch.zeros_like(w)
        if module in VOCAB_PARALLEL:
            return read(0, *self.vocab_span(shape[0]))
        return read(0, 0, shape[0])  # replicated

    def take_blocks(
        self, name: str, file_name: str, parts: tuple[Tensor, ...], block: int = 32
    ) -> tuple[Tensor, ...]:
        """This rank's part of a matrix kept in GGUF blocks of `block` weights along a row:
        `parts` = values [N, K], then scales (and mins) [N, K / block]. Rows are split as they
        are; columns (row-parallel) only by whole blocks, so each rank's blocks are the file's,
        never re-quantized: a split that would cut a block is an error naming the file's
        tensor (`file_name`)."""
        module = name.split(".")[-2]
        columns = parts[0].shape[1]
        if module in ROW_PARALLEL and columns % (block * self.world):
            raise TinyformersError(
                f"tensor parallel: quantize gguf: {file_name}'s {columns} columns split "
                f"{self.world} ways are not whole blocks of {block}; run on a world size "
                f"that gives each rank a multiple of {block} columns, or without quantize gguf"
            )
        return tuple(self.take(name, tuple(p.shape), partial(_narrow, p)) for p in parts)

    def take_all(
        self, weights: dict[str, Tensor], after_each: Callable[[], None] = lambda: None
    ) -> dict[str, Tensor]:
        """This rank's part of every weight in `weights` (whole tensors or views of a file
        mapping), each copied out alone; `after_each` runs after each copy (drops pages)."""
        out = {}
        for name in list(weights):
            w = weights.pop(name)
            out[name] = self.take(name, tuple(w.shape), partial(_copy_out, w, after_each))
            del w  # with it the last view of the file's pages for this tensor
        return out

    def _span(self, size: int, offset: int = 0) -> tuple[int, int]:
        part = size // self.world
        return offset + self.rank * part, offset + (self.rank + 1) * part


def _narrow(w: Tensor, dim: int, start: int, stop: int) -> Tensor:
    return w.narrow(dim, start, stop - start)


def _copy_out(w: Tensor, drop_pages: Callable[[], None], dim: int, start: int, stop: int) -> Tensor:
    """A copy of w's slice start:stop along `dim`, made a few MB of the file at a time, with
    `drop_pages()` after each part, so the pages of a mapped tensor never pile up."""
    part = w.narrow(dim, start, stop - start)
    out = torch.empty(part.shape, dtype=part.dtype)
    if part.dim() == 0 or part.numel() == 0:
        return out.copy_(part)
    rows = max(range(part.dim()), key=part.stride)  # the dim that runs through the file
    step = max(1, CHUNK // (part.stride(rows) * part.element_size()))
    for i in range(0, part.shape[rows], step):
        n = min(step, part.shape[rows] - i)
        out.narrow(rows, i, n).copy_(part.narrow(rows, i, n))
        drop_pages()
    return out
