"""Byte-level BPE: text -> pieces (regex) -> UTF-8 bytes -> merges by rank -> ids.

One core for every byte-level BPE vocabulary (GPT-2, SmolLM2, Llama 3): what differs between
them comes from the source file, never from constants here:
- the split patterns, applied in sequence (SmolLM: every \\p{N} char alone, then GPT-2's pattern);
- the vocabulary, spelled in GPT-2's printable byte alphabet (`bytes_to_unicode`);
- the merges, as pairs in rank order;
- special tokens (matched in text only when the caller allows them) and added tokens (always
  matched, as Hugging Face and llama.cpp do for non-special added tokens).
"""

from __future__ import annotations

import codecs
import gc
import heapq
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from itertools import pairwise
from typing import TYPE_CHECKING, Literal, TypedDict, Unpack

import regex

from tinyformers.errors import TokenizerError

if TYPE_CHECKING:
    from tinyformers.kernels.bpe import NativeEncoder

# GPT-2's pre-tokenization pattern (OpenAI's encoder.py; HF's ByteLevel pre-tokenizer uses it too).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Split patterns of real tokenizers run as given; any other pattern a file brings runs under a
# time limit (the regex module's `timeout=`), since one like (a|aa)+$ backtracks for ever.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_PATTERNS = frozenset({GPT2_PATTERN, LLAMA3_PATTERN, r"\p{N}", r"\p{N}+", r"\p{N}{1,3}"})
MAX_PATTERN_CHARS = 2000
MAX_REPEAT = 1000  # a{1000000000} alone takes the regex module minutes and GBs to compile
_SPLIT_SECONDS = 0.1  # per encode call, plus 1 us a character (the regex module overshoots)
MAX_VOCAB = 1 << 22  # 4M tokens; the largest real vocabularies hold ~256K

_CACHE_MAX_ENTRIES = 1 << 17  # pieces; cleared when full so memory stays bounded
_CACHE_MAX_CHARS = 256  # longer pieces are rare and would pin megabytes in the cache
_NO_MERGE = (1 << 62, -1)  # (rank, id) of a pair that never merges
_NO_RANK = 2**31 - 1  # the same, in `_merge_rounds`' int32 arrays
_UNBUILT = object()  # `Tokenizer._native_encoder` before the first encode asks for it
_LONG_PIECE = 4096  # tokens; longer pieces start merging in vectorised rounds (`_merge_rounds`)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, so every token is a readable string.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) are moved to
    U+0100 and up in byte order, so the space byte is written 'Ġ' (U+0120) in vocab files.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return dict(sorted(table.items()))


_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


class Roles(TypedDict, total=False):
    """The special tokens and roles a tokenizer file names: keywords of every tokenizer."""

    special_tokens: Iterable[str]  # matched in text only where the caller allows them
    added_tokens: Iterable[str]  # always matched (HF and llama.cpp do the same)
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool
    chat_template: str | None


class TokenizerBase:
    """What every tokenizer shares: its roles, `encode` around the literal tokens, batches, and
    decoding through a table of each id's bytes. A subclass sets `source`, `vocab_size` and
    `_id_to_bytes`, and encodes the text between literal tokens in `_encode_text`."""

    source: str
    vocab_size: int
    _id_to_bytes: list[bytes]
    # The C++ loop (kernels/bpe.cpp) where it builds; False runs the Python one, which is its
    # reference (tests/test_tokenizer_native.py compares them).
    native: bool = True
    _native_encoder: NativeEncoder | None | object = _UNBUILT

    def _take_roles(self, ids: Mapping[str, int], roles: Roles) -> None:
        """Check `roles` against the vocabulary (`ids`: token text -> id) and keep them."""
        source = self.source
        special, added = roles.get("special_tokens", ()), roles.get("added_tokens", ())
        self.special_tokens: dict[str, int] = {t: _lookup(ids, t, source) for t in special}
        self.added_tokens: dict[str, int] = {t: _lookup(ids, t, source) for t in added}
        self._literal_ids = {**self.special_tokens, **self.added_tokens}
        self.literals = Literals(self.added_tokens, self.special_tokens)
        self.bos_token_id: int | None = roles.get("bos_token_id")
        self.eos_token_id: int | None = roles.get("eos_token_id")
        self.pad_token_id: int | None = roles.get("pad_token_id")
        self.unk_token_id: int | None = roles.get("unk_token_id")
        named = {"bos": self.bos_token_id, "eos": self.eos_token_id}
        named |= {"pad": self.pad_token_id, "unk": self.unk_token_id}
        for name, i in named.items():
            if i is not None and not (_is_int(i) and 0 <= i < self.vocab_size):
                raise TokenizerError(
                    f"{source}: {name} token id {i!r:.40} is outside the vocabulary"
                )
        # More stop ids (generation_config.json's eos list) get appended by the loaders.
        self.eos_token_ids: list[int] = [] if self.eos_token_id is None else [self.eos_token_id]
        self.add_bos_token = roles.get("add_bos_token", False)
        if not isinstance(self.add_bos_token, bool):
            raise TokenizerError(
                f"{source}: add_bos_token {self.add_bos_token!r:.40} is not a boolean"
            )
        self.chat_template = roles.get("chat_template")
        if not isinstance(self.chat_template, str | None):
            raise TokenizerError(f"{source}: the chat template is not a string")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size})"

    def __len__(self) -> int:
        return self.vocab_size

    def encode(
        self, text: str, *, allowed_special: Set[str] | Literal["all"] = frozenset()
    ) -> list[int]:
        """The ids of `text`, without BOS (`prompt_ids` adds it where the tokenizer asks).
        Special-token text is plain text unless listed in `allowed_special`.

        Example:
            >>> tok.encode("<|endoftext|>")
            [27, 91, 437, 1659, 5239, 91, 29]
            >>> tok.encode("<|endoftext|>", allowed_special="all")
            [50256]
        """
        text = _without_lone_surrogates(text)
        spans = self.literals.find(text, self.literals.allowed(allowed_special, self.source))
        if self.native:
            self._native()  # built (compiled, the first time) before the split's budget starts
        # subtle: one time budget for the whole call, however many pieces the added tokens and
        # the earlier split patterns cut the text into (a budget per piece is no budget)
        deadline = time.monotonic() + _SPLIT_SECONDS + 1e-6 * len(text)
        return self._encode_parts(split_around(text, spans, self._literal_ids), deadline)

    def _encode_parts(self, parts: list[str | int], deadline: float) -> list[int]:
        """The ids of `parts`: texts to encode, and the literal tokens' ids between them."""
        ids: list[int] = []
        for part in parts:
            if isinstance(part, int):
                ids.append(part)
            else:
                ids += self._encode_text(part, deadline)
        return ids

    def _encode_text(self, text: str, deadline: float) -> list[int]:
        """The ids of text between literal tokens; a split of unknown cost stops at `deadline`."""
        raise NotImplementedError

    def _native(self) -> NativeEncoder | None:
        """The C++ encoder, built at the first encode (None where the kernels cannot build)."""
        if self._native_encoder is _UNBUILT:
            self._native_encoder = self._build_native()
        return self._native_encoder  # type: ignore[return-value]

    def _build_native(self) -> NativeEncoder | None:
        return None  # no C++ loop (characters need none)

    def encode_batch(
        self, texts: Iterable[str], *, allowed_special: Set[str] | Literal["all"] = frozenset()
    ) -> list[list[int]]:
        return [self.encode(t, allowed_special=allowed_special) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids`; one token may hold part of a UTF-8 character."""
        return join_token_bytes(self._id_to_bytes, ids, self.source)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_text(self, token_id: int) -> str:
        """One token as text (U+FFFD where it holds only part of a character)."""
        return self.decode_bytes([token_id]).decode("utf-8", errors="replace")

    def decoder(self) -> StreamDecoder:
        """An incremental decoder for streaming generated ids: it never splits a character,
        and drops no space prefix (the ids continue a text)."""
        return StreamDecoder(self)


class Tokenizer(TokenizerBase):
    """Encode text to ids and back, tiktoken's API shape.

    Example:
        >>> tok = load_tokenizer("tests/data/gpt2")
        >>> tok.encode("hello world")
        [31373, 995]
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        split_patterns: list[str],
        *,
        ignore_merges: bool = False,
        source: str = "<memory>",
        merges_source: str | None = None,
        **roles: Unpack[Roles],
    ) -> None:
        """`vocab` holds every token: ordinary ones in the byte alphabet, special/added as text."""
        self.source = source
        _check_vocab(vocab, source)
        self.vocab_size: int = len(vocab)
        self._take_roles(vocab, roles)
        # What it is built from, kept as given so `save_tokenizer` can write it out again.
        self.vocab = vocab
        self.merges = merges
        self.split_patterns = list(split_patterns)
        self.ignore_merges = ignore_merges
        self._id_to_bytes = _id_to_bytes(vocab, self._literal_ids, source)
        self.max_token_bytes = max(map(len, self._id_to_bytes))  # bounds the tokens of a text
        # subtle: some vocabularies lack a few byte tokens (SmolLM has no token for the control
        # bytes 4, 6, 19, 20, 22, 29). Such bytes become the unknown token if the source names
        # one for its BPE model, else they are dropped, as HF tokenizers and llama.cpp do.
        self._byte_ids = [vocab.get(c, self.unk_token_id) for c in bytes_to_unicode().values()]
        self._merges = _pair_ranks(vocab, merges, merges_source or source)
        # subtle: Llama 3 (HF `ignore_merges`) takes a piece that is itself a token as that token,
        # even when the merges would split it differently.
        self._whole_pieces = (
            {self._id_to_bytes[i]: i for i in vocab.values()} if ignore_merges else None
        )
        self._split = [_compile_split(p, source) for p in split_patterns]
        self._cache: dict[str, list[int]] = {}
        self._merge_arrays = None  # `_ranks_of_pairs`' tables, built on the first long piece
        self.bos_token = None if self.bos_token_id is None else self.id_to_text(self.bos_token_id)
        self.eos_token = None if self.eos_token_id is None else self.id_to_text(self.eos_token_id)

    # -- encoding --------------------------------------------------------------------------

    def _encode_text(self, text: str, deadline: float = math.inf) -> list[int]:
        native = self._native() if self.native else None
        if native is not None and native.splits:
            return native.encode(text)
        pieces = self._pieces(text, deadline)  # a pattern of unknown cost: split under the budget
        if native is not None:
            return native.merge(pieces)
        return encode_cached(self._cache, pieces, self._encode_piece)

    def _build_native(self) -> NativeEncoder | None:
        # subtle: imported here, so a tokenizer loads without torch's extension machinery and
        # compiles nothing until it encodes
        from tinyformers.kernels.bpe import byte_level_encoder

        return byte_level_encoder(
            self._merges, self._byte_ids, self.split_patterns, self._whole_pieces
        )

    def _pieces(self, text: str, deadline: float = math.inf) -> list[str]:
        """Split with each pattern in turn; matches and the gaps between them are pieces.

        A pattern of unknown cost runs under what is left of `deadline` (one budget for
        every chunk). A piece of one character is never split further: 10 MB of digits
        (SmolLM2's first split) would otherwise run the next pattern 10^7 times.
        """
        pieces = [text] if text else []
        for pattern, timeout in self._split:
            if timeout is None:
                pieces = [
                    p
                    for chunk in pieces
                    for p in (_split_isolated(pattern, chunk) if len(chunk) > 1 else (chunk,))
                ]
                continue
            split = []
            for chunk in pieces:
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise TimeoutError
                    split += _split_isolated(pattern, chunk, timeout=left)
                except TimeoutError as e:
                    raise TokenizerError(
                        f"{self.source}: split pattern {pattern.pattern!r:.80} took over "
                        f"{timeout + 1e-6 * len(text):.1f} s on a text of {len(text)} characters "
                        "(a pattern that backtracks?)"
                    ) from e
            pieces = split
        return pieces

    def _encode_piece(self, piece: str) -> list[int]:
        data = piece.encode("utf-8")
        if self._whole_pieces is not None and data in self._whole_pieces:
            return [self._whole_pieces[data]]
        if len(data) > _LONG_PIECE:
            return self._merge(self._merge_rounds(data))
        ids = [self._byte_ids[b] for b in data]
        return self._merge([i for i in ids if i is not None] if None in ids else ids)

    def _merge(self, ids: list[int]) -> list[int]:
        """Apply merges lowest rank first, leftmost first on ties, in O(n log n).

        A heap of (rank, position) over a linked list of live tokens: each merge pushes at most
        the two new neighbour pairs, so a 1 MB piece with no spaces costs ~n log n, not n^2.
        Stale heap entries (a side already merged away) are skipped when popped.
        """
        merges = self._merges
        heap = [(merges[p][0], i) for i, p in enumerate(pairwise(ids)) if p in merges]
        if not heap:
            return ids  # nothing to merge (a long run after `_merge_rounds`, often)
        heapq.heapify(heap)
        n = len(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] < 0 or j >= n or merges.get((ids[i], ids[j]), _NO_MERGE)[0] != rank:
                continue  # stale: the pair at i changed since it was pushed
            ids[i], ids[j] = merges[ids[i], ids[j]][1], -1
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
                if (right := merges.get((ids[i], ids[nxt[i]]))) is not None:
                    heapq.heappush(heap, (right[0], i))
            if prv[i] >= 0 and (left := merges.get((ids[prv[i]], ids[i]))) is not None:
                heapq.heappush(heap, (left[0], prv[i]))
        return [t for t in ids if t >= 0]

    def _merge_rounds(self, data: bytes) -> list[int]:
        """Merge a long piece in rounds while rounds pay: each round applies the lowest-ranked
        pair present at every place at once (leftmost first where they overlap, as `_merge`
        does), in numpy. 10 MB of one character then takes a few rounds, not 10^7 heap steps.

        subtle: the state after a round is the state `_merge` reaches after the same rank, so
        `_merge` finishes the piece once a round merges too few pairs to be worth it.
        """
        import numpy as np

        byte_ids = np.array([-1 if i is None else i for i in self._byte_ids], dtype=np.int32)
        a = byte_ids[np.frombuffer(data, dtype=np.uint8)]
        a = a[a >= 0]  # bytes without a token are dropped, as in `_encode_piece`
        while len(a) > _LONG_PIECE:
            rank = self._ranks_of_pairs(a)
            best = rank.min()
            hits = np.flatnonzero(rank == best)
            del rank
            if best == _NO_RANK or len(hits) * 64 < len(a):
                break
            # a run of hits (pair x x over x x x ...) overlaps: keep the 1st, 3rd, ... of each
            new_run = np.concatenate(([True], np.diff(hits) != 1))
            run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(hits)), 0))
            hits = hits[(np.arange(len(hits)) - run_start) % 2 == 0]
            a[hits] = self._merges[int(a[hits[0]]), int(a[hits[0] + 1])][1]
            a = np.delete(a, hits + 1)
        return a.tolist()

    def _ranks_of_pairs(self, a):
        """The merge rank of each adjacent pair of `a` (int32; _NO_RANK where none), computed
        a block at a time so the temporaries stay a few MB whatever the piece's length."""
        import numpy as np

        if self._merge_arrays is None:  # pair keys (left * vocab_size + right) sorted, ranks
            items = sorted((x * self.vocab_size + y, v[0]) for (x, y), v in self._merges.items())
            keys = np.array([k for k, _ in items] + [-1], dtype=np.int64)
            ranks = np.array([r for _, r in items] + [_NO_RANK], dtype=np.int32)
            self._merge_arrays = keys, ranks
        keys, ranks = self._merge_arrays
        out = np.empty(len(a) - 1, dtype=np.int32)
        for start in range(0, len(out), 1 << 18):
            stop = min(start + (1 << 18), len(out))
            pairs = a[start:stop].astype(np.int64) * self.vocab_size + a[start + 1 : stop + 1]
            at = np.minimum(np.searchsorted(keys[:-1], pairs), len(keys) - 1)
            out[start:stop] = np.where(keys[at] == pairs, ranks[at], _NO_RANK)
        return out


class StreamDecoder:
    """Feed ids one at a time; get back only complete characters.

    subtle: an emoji or CJK character spans several tokens; decoding each token alone prints
    U+FFFD. UTF-8 bytes of an unfinished character wait for the next token, so the pieces joined
    equal `decode(ids)` exactly.
    """

    def __init__(self, tokenizer: TokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """The held-back tail: U+FFFD for a character that never finished."""
        return self._utf8.decode(b"", final=True)


def join_token_bytes(id_to_bytes: list[bytes], ids: Iterable[int], source: str) -> bytes:
    """The bytes of the tokens `ids`, one after another; TokenizerError for an id outside the
    vocabulary (every tokenizer decodes this way: what differs is what a token's bytes are)."""
    ids = list(ids)
    if ids and (min(ids) < 0 or max(ids) >= len(id_to_bytes)):
        bad = next(i for i in ids if not 0 <= i < len(id_to_bytes))
        raise TokenizerError(f"{source}: token id {bad} is outside 0..{len(id_to_bytes) - 1}")
    return b"".join([id_to_bytes[i] for i in ids])


class Literals:
    """Finds a tokenizer's added and special tokens in text, each where it starts leftmost, the
    longest of those allowed where several start at one place (as an alternation sorted
    longest first would).

    subtle: one regex for all of them, written as a trie (each wide node split in halves
    behind a lookahead of their first characters, since `re` tries an alternation's branches
    one by one), compiled once on first use: 100k added tokens as an alternation per set of
    allowed specials took 10 s to compile. Where the longest token found is not allowed (a
    special the caller did not allow), the longest allowed one is one of its prefixes.
    """

    def __init__(self, added: Iterable[str], special: Iterable[str]) -> None:
        self.added, self.special = frozenset(added), frozenset(special)
        self._pattern: re.Pattern | None = None

    def allowed(self, allowed_special: Set[str] | Literal["all"], source: str) -> Set[str]:
        """The specials `encode(allowed_special=...)` may match, checked against ours."""
        if allowed_special == "all":
            return self.special
        if unknown := set(allowed_special) - self.special:
            raise ValueError(f"not special tokens of {source}: {sorted(unknown)}")
        return allowed_special

    def find(self, text: str, specials: Set[str], added: bool = True) -> Iterator[tuple[int, int]]:
        """(start, end) of each token found: the added ones (unless `added` is False) and
        the `specials`. The regex is compiled here, not when the spans are first read."""
        if not (specials or (added and self.added)):
            return iter(())
        return self._spans(self._compiled(), text, specials, added)

    def _spans(self, pattern: re.Pattern, text: str, specials: Set[str], added: bool):
        pos = 0
        while (m := pattern.search(text, pos)) is not None:
            token = m.group()
            while token and not (token in specials or (added and token in self.added)):
                token = token[:-1]  # rare: special-token text the caller did not allow
            if not token:
                pos = m.start() + 1
                continue
            yield m.start(), m.start() + len(token)
            pos = m.start() + len(token)

    def _compiled(self) -> re.Pattern:
        if self._pattern is None:
            self._pattern = literal_pattern(self.added | self.special)
        return self._pattern


def literal_pattern(tokens: Set[str]) -> re.Pattern:
    """A regex that finds `tokens` in text, the longest where several start at one place."""
    # subtle: the trie and the compiled regex make ~10 objects a node, and with torch loaded
    # each collection the garbage collector runs meanwhile walks a large heap: without it,
    # 3x faster (100k tokens: ~1 s)
    collecting = gc.isenabled()
    gc.disable()
    try:
        root: dict = {}
        for token in tokens:
            node = root
            for char in token:
                node = node.setdefault(char, {})
            node[""] = {}  # a token ends here
        return re.compile(_trie_pattern(root) or "(?!)")
    except RecursionError:  # a trie hundreds of branchings deep ("a", "aa", "aaa" ...)
        longest_first = sorted(set(tokens), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, longest_first)))
    finally:
        if collecting:
            gc.enable()


def _trie_pattern(node: dict) -> str:
    branches = []
    for char, child in sorted(node.items()):
        if not char:
            continue
        run = char
        while len(child) == 1 and "" not in child:  # a chain of single children: one literal
            ((char, child),) = child.items()
            run += char
        branches.append((run, child))
    if not branches:
        return ""
    body = _split_branches(branches)
    return f"(?:{body})?" if "" in node else body  # greedy: the longer token first


def _split_branches(branches: list[tuple[str, dict]]) -> str:
    if len(branches) <= 16:
        alternatives = [re.escape(run) + _trie_pattern(child) for run, child in branches]
        return alternatives[0] if len(alternatives) == 1 else f"(?:{'|'.join(alternatives)})"
    half = len(branches) // 2
    first = "".join(re.escape(run[0]) for run, _ in branches[:half])
    return f"(?:(?=[{first}]){_split_branches(branches[:half])}|{_split_branches(branches[half:])})"


def split_around(
    text: str, spans: Iterable[tuple[int, int]], literal_ids: dict[str, int]
) -> list[str | int]:
    """The text between the literal tokens at `spans` (from `Literals.find`), and between
    those texts each literal token's id (`literal_ids`)."""
    parts: list[str | int] = []
    start = 0
    for begin, end in spans:
        parts += [text[start:begin], literal_ids[text[begin:end]]]
        start = end
    return [*parts, text[start:]]


def encode_cached(
    cache: dict[str, list[int]], pieces: Iterable[str], encode: Callable[[str], list[int]]
) -> list[int]:
    """The ids of `pieces`, each `encode`d once: pieces repeat like words, so a cache of them
    saves most merges (cleared when full, so memory stays bounded)."""
    ids: list[int] = []
    for piece in pieces:
        piece_ids = cache.get(piece)
        if piece_ids is None:
            piece_ids = encode(piece)
            if len(piece) <= _CACHE_MAX_CHARS:
                if len(cache) >= _CACHE_MAX_ENTRIES:
                    cache.clear()
                cache[piece] = piece_ids
        ids += piece_ids
    return ids


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_vocab(vocab: dict[str, int], source: str) -> None:
    """Every token a non-empty string, the ids exactly 0..n-1, each once."""
    if not isinstance(vocab, dict) or not 0 < len(vocab) <= MAX_VOCAB:
        raise TokenizerError(f"{source}: expected a vocabulary of 1 to {MAX_VOCAB} tokens")
    for token, i in vocab.items():
        if not isinstance(token, str) or not token:
            raise TokenizerError(f"{source}: token {token!r:.40} is empty or not a string")
        if not _is_int(i) or not 0 <= i < len(vocab):
            raise TokenizerError(
                f"{source}: token {token!r:.40} has id {i!r:.40}, expected 0..{len(vocab) - 1} "
                "(ids are dense)"
            )
    if len(set(vocab.values())) != len(vocab):
        seen: dict[int, str] = {}
        twice = next(t for t, i in vocab.items() if seen.setdefault(i, t) != t)
        raise TokenizerError(f"{source}: token {twice!r:.40} reuses id {vocab[twice]}")


def _compile_split(pattern: str, source: str) -> tuple[regex.Pattern, float | None]:
    """A split pattern and its time limit (None for the patterns of real tokenizers)."""
    if not isinstance(pattern, str) or not 0 < len(pattern) <= MAX_PATTERN_CHARS:
        raise TokenizerError(f"{source}: split pattern {pattern!r:.80} is empty or too long")
    if pattern in KNOWN_PATTERNS:
        return regex.compile(pattern), None
    for m in regex.finditer(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}", pattern):
        if any(n and int(n) > MAX_REPEAT for n in m.groups()):
            raise TokenizerError(
                f"{source}: split pattern {pattern!r:.80} repeats {m.group()} times "
                f"(at most {MAX_REPEAT})"
            )
    try:
        return regex.compile(pattern), _SPLIT_SECONDS
    except (regex.error, OverflowError, RecursionError, ValueError) as e:
        raise TokenizerError(f"{source}: split pattern {pattern!r:.80} is not a regex: {e}") from e


def _lookup(ids: Mapping[str, int], token: str, source: str) -> int:
    if not isinstance(token, str) or not token:
        raise TokenizerError(f"{source}: special or added token {token!r:.40} is empty")
    if token not in ids:
        raise TokenizerError(f"{source}: token {token!r:.40} is not in the vocabulary")
    return ids[token]


def _id_to_bytes(vocab: dict[str, int], literal: dict[str, int], source: str) -> list[bytes]:
    """Bytes of every id: literal tokens as their UTF-8 text, the rest through the byte alphabet."""
    table: list[bytes | None] = [None] * len(vocab)  # ids are 0..n-1 (`_check_vocab`)
    for token, i in vocab.items():
        if token in literal:
            try:
                table[i] = token.encode("utf-8")
            except UnicodeEncodeError as e:
                raise TokenizerError(f"{source}: token {i} is not valid Unicode ({e})") from e
            continue
        try:
            table[i] = bytes(_BYTE_DECODER[c] for c in token)
        except KeyError as e:
            raise TokenizerError(
                f"{source}: token {i} {token!r} is not spelled in the byte-level alphabet"
            ) from e
    if None in table:
        raise TokenizerError(
            f"{source}: token id {table.index(None)} is missing from the vocabulary"
        )
    return table  # type: ignore[return-value]


def _pair_ranks(
    vocab: dict[str, int], merges: list[tuple[str, str]], source: str
) -> dict[tuple[int, int], tuple[int, int]]:
    """(left id, right id) -> (rank, merged id)."""
    table = {}
    for rank, (left, right) in enumerate(merges):
        try:
            pair = vocab[left], vocab[right]
            merged = vocab[left + right]
        except KeyError as e:
            raise TokenizerError(
                f"{source}: merge {rank} '{left} {right}' names {e.args[0]!r}, not in the vocab"
            ) from e
        table.setdefault(pair, (rank, merged))  # a repeated pair keeps its first rank (llama.cpp)
    return table


def _split_isolated(pattern: regex.Pattern, text: str, timeout: float | None = None) -> list[str]:
    """Matches of `pattern` and the gaps between them, in order (HF's Split "isolated")."""
    if not pattern.groups:
        found = pattern.findall(text, timeout=timeout)
        if sum(map(len, found)) == len(text):
            return found  # the usual case: the pattern covers every character
    pieces, end = [], 0
    for m in pattern.finditer(text, timeout=timeout):
        if m.start() > end:
            pieces.append(text[end : m.start()])
        if m.end() > m.start():
            pieces.append(m.group())
        end = m.end()
    if end < len(text):
        pieces.append(text[end:])
    return pieces


def _without_lone_surrogates(text: str) -> str:
    """Text that UTF-8 can encode, the way tiktoken fixes it up.

    subtle: a Python str may hold surrogate code points (from JSON '\\ud83d' escapes or
    surrogateescape). Like tiktoken, a valid high+low pair becomes its character and a lone
    surrogate becomes U+FFFD (HF tokenizers raises a TypeError instead).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text
