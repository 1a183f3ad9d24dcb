"""Training data: a text file or JSONL records, as token ids and the batches drawn from them.

A plain text file is one long stream of tokens; a batch is `batch_size` windows of
`block_size + 1` tokens starting at random places (nanoGPT's `get_batch`): the model reads
tokens 0..T-1 of a window and is scored on predicting 1..T. JSONL holds one record per line,
`{"text": ...}` (a document, scored on every token) or `{"messages": [...]}` (a chat,
rendered by the model's chat template and scored on the assistant's tokens only); there a
window starts at the beginning of a record and is scored up to its end, so a chat is read
from its first turn (records longer than a block are cut there).

The split is fixed, as nanoGPT's: the first 90% of the tokens (of the records, for JSONL)
train, the last 10% validate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tinyformers.chat.template import encode_chat
from tinyformers.errors import DataError
from tinyformers.loading.json_file import read_bytes
from tinyformers.training.loss import IGNORE

MAX_DATA_BYTES = 2**32  # 4 GiB: more than a CPU trains on, less than this machine's memory
TRAIN_SHARE = 0.9


@dataclass
class Split:
    """Token ids, whether each one is scored, and where a window may start."""

    ids: Tensor  # (N,) int64
    scored: Tensor  # (N,) bool: False for prompt tokens of a chat
    starts: Tensor | None  # (R,) where each record begins; None: a plain text, no records
    ends: Tensor | None  # (R,) where each record ends: a window reads no further

    def batch(
        self, rows: int, block_size: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """`rows` random windows: inputs (rows, block_size) and targets (rows, block_size),
        the inputs shifted left by one, IGNORE where a target is not scored or past the end."""
        if self.starts is None:
            first = torch.randint(len(self.ids) - block_size, (rows,), generator=generator)
            end = torch.full((rows,), len(self.ids))
        else:
            record = torch.randint(len(self.starts), (rows,), generator=generator)
            first, end = self.starts[record], self.ends[record]
        index = first[:, None] + torch.arange(block_size + 1)  # (rows, block_size + 1)
        inside = index < end[:, None]  # a short record leaves the rest of its window unscored
        index = index.clamp(max=len(self.ids) - 1)
        ids, scored = self.ids[index], self.scored[index] & inside
        targets = ids[:, 1:].masked_fill(~scored[:, 1:], IGNORE)
        return ids[:, :-1], targets


@dataclass
class Dataset:
    train: Split
    val: Split
    kind: str  # "text" or "jsonl"


def read_text_file(path: Path) -> str:
    """The UTF-8 text of `path`; DataError for a missing, empty or non-UTF-8 file."""
    data = read_bytes(path, DataError, limit=MAX_DATA_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, "
            f"line {line}); convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; training needs text")
    return text


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


def read_records(path: Path, text: str) -> list[dict]:
    """The JSONL records of `text`, each an object with "text" (a string) or "messages" (a
    list of {"role", "content"} objects); DataError naming the first bad line."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}: line {number} is not JSON ({e})") from None
        if not _valid_record(record):
            raise DataError(
                f'{path}: line {number}: expected an object with "text" (a string) or '
                f'"messages" (a list of {{"role", "content"}} objects), got {line[:60]!r}'
            )
        records.append(record)
    return records


def _valid_record(record) -> bool:
    if not isinstance(record, dict):
        return False
    if isinstance(record.get("text"), str):
        return True
    messages = record.get("messages")
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    )


def encode_record(tokenizer, record: dict) -> tuple[list[int], list[bool]]:
    """Token ids of one record and which of them are scored.

    A text is scored on every token and ends with EOS (when the tokenizer has one), so the
    model learns where a document stops. A chat is scored on what the assistant says,
    end-of-turn token included: the prompt is given, never learned.

    subtle: the assistant's tokens are found by rendering the chat up to each assistant
    message twice, once ending with the generation prompt (what the model sees before it
    answers) and once with the answer; the tokens between the two are the answer. The
    template must render a conversation so that each shorter one is a prefix of it (every
    real template does); one that rewrites earlier turns is refused.
    """
    if "text" in record:
        ids = tokenizer.encode(record["text"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return ids, [True] * len(ids)
    messages = record["messages"]
    ids = encode_chat(tokenizer, messages, add_generation_prompt=False)
    scored = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = encode_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = encode_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if ids[: len(before)] != before or ids[: len(upto)] != upto:
            raise DataError(
                "the chat template renders a conversation differently from its own beginning, "
                "so the assistant's tokens cannot be told apart"
            )
        scored[len(before) : len(upto)] = [True] * (len(upto) - len(before))
    if not any(scored):
        raise DataError("a chat without an assistant message has nothing to learn")
    return ids, scored


def load_dataset(path: Path, text: str, tokenizer, block_size: int) -> Dataset:
    """`text` (the content of `path`) as token ids, split 90/10 into train and val."""
    if is_jsonl(path):
        dataset = _records_dataset(path, text, tokenizer)
    else:
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        n = int(len(ids) * TRAIN_SHARE)
        everything = torch.ones(len(ids), dtype=torch.bool)
        dataset = Dataset(
            Split(ids[:n], everything[:n], None, None),
            Split(ids[n:], everything[n:], None, None),
            "text",
        )
        shortest = min(len(dataset.train.ids), len(dataset.val.ids))
        if shortest <= block_size:
            need = int((block_size + 1) / (1 - TRAIN_SHARE)) + 1
            raise DataError(
                f"{path}: {len(ids)} tokens, too short for --block-size {block_size}: the last "
                f"10% (validation) must hold more than a block, so at least {need} tokens "
                "(use a longer text or a smaller --block-size)"
            )
    return dataset


def _records_dataset(path: Path, text: str, tokenizer) -> Dataset:
    records = read_records(path, text)
    if len(records) < 2:
        raise DataError(
            f"{path}: {len(records)} record(s); training needs at least 2 (the last 10%, at "
            "least one, validate)"
        )
    n_train = min(int(len(records) * TRAIN_SHARE), len(records) - 1)
    encoded = []
    for number, record in enumerate(records, start=1):
        try:
            encoded.append(encode_record(tokenizer, record))
        except DataError as e:
            raise DataError(f"{path}: record {number}: {e}") from None
    return Dataset(_join(encoded[:n_train]), _join(encoded[n_train:]), "jsonl")


def _join(encoded: list[tuple[list[int], list[bool]]]) -> Split:
    """Records one after another in one stream; a window starts where a record begins."""
    lengths = torch.tensor([len(ids) for ids, _ in encoded])
    ends = torch.cumsum(lengths, 0)  # (records,)
    starts = ends - lengths
    ids = torch.tensor([i for ids, _ in encoded for i in ids], dtype=torch.long)
    scored = torch.tensor([s for _, scored in encoded for s in scored], dtype=torch.bool)
    return Split(ids, scored, starts, ends)
