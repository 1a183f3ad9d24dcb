"""The model a run trains: a new one from scratch, or a loaded checkpoint (with LoRA or not),
and how it is written to the out dir as a checkpoint every tinyformers command (and Hugging
Face) loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tinyformers.errors import TinyformersError
from tinyformers.kernels.train_linear import use_fast_matmuls
from tinyformers.loading.export import save_pretrained
from tinyformers.models import set_fast_path
from tinyformers.models.gpt2 import GPT2Config
from tinyformers.models.llama import LlamaConfig
from tinyformers.tokenizers import load_tokenizer
from tinyformers.tokenizers.chars import CharTokenizer
from tinyformers.tokenizers.save import save_tokenizer
from tinyformers.training.chunked_loss import DeferredHead, defer_head
from tinyformers.training.lora import DEFAULT_TARGETS, add_lora, lora_modules, save_adapter
from tinyformers.training.settings import TrainSettings


@dataclass
class TrainedModel:
    net: nn.Module  # its forward gives the final hidden states: `head` makes the logits
    head: DeferredHead  # lm_head, applied by the loss (chunked_loss.py)
    tokenizer: object
    settings: TrainSettings
    matmuls: dict[str, str]  # the matmul kernel per weight shape ("in x out")


def build_model(
    settings: TrainSettings, text: str, device: torch.device, matmuls: dict | None = None
) -> TrainedModel:
    """The model to train, in training mode on `device`, its trainable weights requiring grad.

    matmuls: the kernel choices of the run being resumed (the same kernels, the same bits);
    None: measured here.
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.model is None:
        tokenizer = scratch_tokenizer(settings.tokenizer or "char", text)
        net = scratch_model(settings, tokenizer).to(device)
    else:
        net, tokenizer = pretrained_model(settings, device)
    set_fast_path(net, True)  # SDPA and torch's fused layer norm: both have a backward
    net.train()
    if device.type == "cpu" and matmuls != {}:
        rows = settings.batch_size * settings.block_size
        matmuls = use_fast_matmuls(net, rows, matmuls)
    head = defer_head(net)
    return TrainedModel(net, head, tokenizer, settings, matmuls or {})


def scratch_tokenizer(name: str, text: str):
    """ "char": the text's own characters (nanoGPT's shakespeare_char); else the tokenizer of a
    model (`gpt2`, `smollm2`, a folder or a .gguf file)."""
    if name == "char":
        return CharTokenizer.from_text(text, source="characters of the training text")
    return load_tokenizer(name)


def scratch_model(settings: TrainSettings, tokenizer) -> nn.Module:
    """A new model of `settings.arch` with the sizes of the settings and the tokenizer's
    vocabulary, initialised as its paper does (the architecture's `init_weights`)."""
    s, p = settings, settings.dropout or 0.0
    eos = tokenizer.eos_token_id
    if s.n_embd % s.n_head:
        raise TinyformersError(f"--n-embd {s.n_embd} is not a multiple of --n-head {s.n_head}")
    if s.arch == "gpt2":
        from tinyformers.models.gpt2 import GPT2

        config = GPT2Config.from_dict(dict(
            vocab_size=tokenizer.vocab_size,
            n_positions=s.block_size,
            n_embd=s.n_embd,
            n_layer=s.n_layer,
            n_head=s.n_head,
            # nanoGPT's exact GELU: the same curve within 1e-3 as GPT-2's tanh approximation,
            # and 3x faster in torch on the CPU (measured, docs/training.md)
            activation_function="gelu",
            embd_pdrop=p,
            attn_pdrop=p,
            resid_pdrop=p,
            bos_token_id=eos,
            eos_token_id=eos,
        ))  # fmt: skip
        net = GPT2(config)
    elif s.arch == "llama":
        from tinyformers.models.llama import Llama

        if (s.n_embd // s.n_head) % 2:
            raise TinyformersError(
                f"--n-embd / --n-head = {s.n_embd // s.n_head}: rotary positions need an even "
                "head size"
            )
        config = LlamaConfig.from_dict(dict(
            vocab_size=tokenizer.vocab_size,
            hidden_size=s.n_embd,
            # SwiGLU's three matrices at 8/3 the width hold what GPT-2's two at 4x hold
            intermediate_size=-(-8 * s.n_embd // 3 // 32) * 32,
            num_hidden_layers=s.n_layer,
            num_attention_heads=s.n_head,
            num_key_value_heads=s.n_head,
            max_position_embeddings=s.block_size,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            attention_dropout=p,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos,
        ))  # fmt: skip
        net = Llama(config)
    else:
        raise TinyformersError(f"--arch {s.arch!r}: expected gpt2 or llama")
    net.init_weights()
    return net


def pretrained_model(settings: TrainSettings, device: torch.device) -> tuple[nn.Module, object]:
    """The checkpoint `settings.model`, its matrices as the file holds them (a GGUF's quantized
    blocks dequantized), every weight trainable or, with LoRA, only the adapters'."""
    import tinyformers

    try:
        lm = tinyformers.load(
            settings.model,
            dtype=settings.dtype,
            device=device,
            fast=False,
            threads=settings.threads,
        )
    except ValueError as e:
        raise TinyformersError(str(e)) from e
    net, context = lm.net, lm.config.context_length
    if lm.tokenizer is None:
        raise TinyformersError(f"{lm.source}: no tokenizer files: training needs the text's ids")
    if settings.tokenizer not in (None, str(settings.model)):
        raise TinyformersError("--tokenizer: a fine-tuned model keeps its own tokenizer")
    if settings.block_size > context:
        raise TinyformersError(
            f"--block-size {settings.block_size} is longer than the model's context of {context}"
        )
    if settings.dropout is not None:
        set_dropout(net, settings.dropout)
    # a GGUF's config holds no bos/eos ids (its tokenizer does): the exported config.json
    # and generation_config.json need them for Hugging Face's generate to stop
    if net.config.eos_token_id is None and lm.tokenizer.eos_token_ids:
        ids = lm.tokenizer.eos_token_ids
        net.config.eos_token_id = ids[0] if len(ids) == 1 else list(ids)
    if net.config.bos_token_id is None:
        net.config.bos_token_id = lm.tokenizer.bos_token_id
    if settings.lora is None:
        net.requires_grad_(True)
    else:
        targets = settings.lora_targets or DEFAULT_TARGETS[type(net).__name__]
        alpha = settings.lora_alpha or 2 * settings.lora
        add_lora(net, settings.lora, alpha, tuple(targets), settings.lora_dropout)
    return net, lm.tokenizer


def set_dropout(net: nn.Module, p: float) -> None:
    """Every dropout of `net` at probability p, in its modules and in its config (which the
    exported config.json carries)."""
    modules = [m for m in net.modules() if hasattr(m, "dropout_p")]
    if not modules:
        raise TinyformersError(f"--dropout: {type(net).__name__} has no dropout to set")
    for module in modules:
        module.dropout_p = p
    for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop", "attention_dropout"):
        if hasattr(net.config, name):
            setattr(net.config, name, p)


def write_model(model: TrainedModel, out: Path) -> None:
    """The model as a checkpoint in `out`: Hugging Face's config.json, model.safetensors and
    tokenizer files; a LoRA run writes PEFT's adapter files instead, unless merged."""
    net, settings = model.net, model.settings
    out.mkdir(parents=True, exist_ok=True)
    modules = lora_modules(net)
    if modules and not settings.merge:
        save_adapter(net, out, str(settings.model), settings.lora_dropout)
        return
    save_pretrained(net, out, state=merged_state(net) if modules else None)
    save_tokenizer(model.tokenizer, out)


def merged_state(net: nn.Module) -> dict[str, Tensor]:
    """`net`'s state under the plain model's names, each LoRA update added into its weight
    (new tensors: the model being trained keeps its adapters apart)."""
    state = {}
    modules = lora_modules(net)
    for name, tensor in net.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in modules:  # lora_A, lora_B: merged below
            continue
        if owner.endswith(".base") and owner.removesuffix(".base") in modules:
            module_name = owner.removesuffix(".base")
            if leaf == "weight":
                tensor = tensor + modules[module_name].delta().detach().to(tensor.dtype)
            name = f"{module_name}.{leaf}"
        state[name] = tensor
    return state
