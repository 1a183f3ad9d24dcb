"""Looking inside a running model: named activations, hooks that read or replace them, the logit
lens, and TransformerLens's tools on top: the residual stream decomposed, direct logit
attribution, and the weights in its shapes (W_Q, W_O, W_U ...).

The names are TransformerLens's, fired by the model files at the line that computes each value
(models/hooks.py). While a hook listens, attention and layer norm take their written-out path,
so the scores and the pattern exist; matrices stay as loaded (packed, quantized), so the values
are those of the model that generates.

Our weights are the checkpoint's: TransformerLens loaded with `fold_ln=False,
center_writing_weights=False, center_unembed=False` holds the same matrices. Where its default
`fold_ln=True` changes a result, the docstring says which one we give.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tinyformers.kernels.modules import RowSlice
from tinyformers.kernels.packed import PackedWeight
from tinyformers.models import gemma3, gpt2

if TYPE_CHECKING:
    from tinyformers.lm import LanguageModel

# cache["pattern", 3] -> "blocks.3.attn.hook_pattern": the short names TransformerLens takes.
ATTENTION = ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z")
MLP = ("pre", "post")

# Which activations to cache or hook, as TransformerLens takes them: a name, or a filter that
# is a function of the name (`lambda name: name.endswith("hook_pattern")`).
NameOrFilter = str | Callable[[str], bool]
# pos_slice / batch_slice, as TransformerLens's Slice: an int (that index, the dim dropped),
# a tuple (slice(*tuple)), a slice, a list or tensor of indices, or None (everything).
SliceInput = int | tuple | slice | list[int] | Tensor | None


def act_name(short: str, layer: int) -> str:
    """The full name of `short` in block `layer`. Example: act_name("resid_pre", 0)."""
    if short in ATTENTION:
        return f"blocks.{layer}.attn.hook_{short}"
    if short in MLP:
        return f"blocks.{layer}.mlp.hook_{short}"
    if short in ("ln1", "ln2"):
        return f"blocks.{layer}.{short}.hook_normalized"
    return f"blocks.{layer}.hook_{short}"  # resid_pre, attn_out, resid_mid, mlp_out, resid_post


class HookName(str):
    """The name a hook function gets: a str, as `fn(value, name)` always had it, that also
    reads as TransformerLens's HookPoint, so its `fn(value, hook)` with `hook.name` runs as is.

    One object fits both signatures: nothing guesses which one a function was written for.
    Example: `def fn(z, hook): print(hook.name, hook.layer())` -> blocks.3.attn.hook_z 3
    """

    @property
    def name(self) -> str:
        return str(self)

    def layer(self) -> int:
        """The block this point is in, as TransformerLens's `hook.layer()`."""
        parts = self.split(".")
        if parts[0] != "blocks":
            raise ValueError(f"{self} is not inside a block")
        return int(parts[1])


@contextmanager
def listening(net: nn.Module, fn: Callable[[str, Tensor], Tensor]) -> Iterator[None]:
    """Call `fn(name, value)` at every named point of `net` while the block runs."""
    if net.hooks.fn is not None:
        raise RuntimeError("a hook function is already set on this model")
    net.hooks.fn = fn
    try:
        yield
    finally:
        net.hooks.fn = None


def hook_names(net: nn.Module) -> list[str]:
    """Every name the model fires, in the order it computes them (one token, run once)."""
    names: list[str] = []
    with torch.inference_mode(), listening(net, lambda name, x: names.append(name) or x):
        net(torch.zeros(1, 1, dtype=torch.long, device=_device(net)))
    return names


def run_with_cache(
    model: LanguageModel,
    ids: Tensor,
    mask: Tensor | None = None,
    names: NameOrFilter | list[NameOrFilter] | None = None,
) -> tuple[Tensor, ActivationCache]:
    """(logits [B, T, V], the activations `names` selects, or all of them). The cache keeps
    `model`: its tools read the weights and the final norm."""
    logits, activations = _record(model.net, ids, mask, names)
    return logits, ActivationCache(model, activations)


def run_with_hooks(
    net: nn.Module,
    ids: Tensor,
    mask: Tensor | None,
    fwd_hooks: list[tuple[NameOrFilter, Callable[[Tensor, HookName], Tensor | None]]],
) -> Tensor:
    """Logits with each `fn(value, hook)` of `fwd_hooks` run at the points its name (or
    filter) selects, in list order; a returned tensor replaces the value (ablation,
    patching), None leaves it as it was. `hook` is a HookName: the name, with `.name`."""

    def apply(name: str, x: Tensor) -> Tensor:
        for key, fn in fwd_hooks:
            if _selects(key, name):
                out = fn(x, HookName(name))
                x = x if out is None else out
        return x

    return _run(net, ids, mask, apply, [key for key, _ in fwd_hooks])


def _record(
    net: nn.Module, ids: Tensor, mask: Tensor | None, names: NameOrFilter | list | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """(logits, {name: value}) for the names `names` selects (every name when None)."""
    keys = [] if names is None else [names] if isinstance(names, str) or callable(names) else names
    activations: dict[str, Tensor] = {}

    def record(name: str, x: Tensor) -> Tensor:
        if not keys or any(_selects(key, name) for key in keys):
            activations[name] = x
        return x

    return _run(net, ids, mask, record, keys), activations


def _selects(key: NameOrFilter, name: str) -> bool:
    return key == name if isinstance(key, str) else bool(key(name))


def _run(net: nn.Module, ids: Tensor, mask: Tensor | None, fn, keys: list[NameOrFilter]) -> Tensor:
    """Logits of one forward with `fn` at every named point. A name in `keys` that the
    forward never reached, or a filter that selected none, is a ValueError (a typo: the
    forward reaches every name the model has)."""
    seen: list[str] = []

    def each(name: str, x: Tensor) -> Tensor:
        seen.append(name)
        return fn(name, x)

    with torch.inference_mode(), listening(net, each):
        logits = net(ids, mask)
    for key in keys:
        if not any(_selects(key, name) for name in seen):
            what = f"named {key!r}" if isinstance(key, str) else f"selected by {key}"
            raise ValueError(f"no activation {what} (model.hook_names() lists the {len(seen)})")
    return logits


def logit_lens(net: nn.Module, ids: Tensor) -> Tensor:
    """What the model would predict if it stopped before each block, and at the end:
    logits [n_layer + 1, T, V] for one sequence `ids` [1, T] (nostalgebraist, 2020).

    subtle: the final norm is recomputed on each layer's residual; reusing the scale of the
    last layer's (TransformerLens #1076) gives the early layers wrong probabilities.
    """
    n_layer = net.config.layer_count
    names = [act_name("resid_pre", i) for i in range(n_layer)]
    names.append(act_name("resid_post", n_layer - 1))
    _, cache = _record(net, ids, None, names)
    resid = torch.cat([cache[name] for name in names])  # (n_layer + 1, T, C)
    with torch.inference_mode():
        return net.unembed(resid)  # (n_layer + 1, T, V)


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


class ActivationCache(dict):
    """Activations by name, each [batch, ...], and `model`, the LanguageModel they came from
    (its weights and final norm are what the tools below read).

    `cache["pattern", L]` is short for `cache["blocks.L.attn.hook_pattern"]`; L may count from
    the end (-1: the last block); `cache["embed"]` for `cache["hook_embed"]`. Shapes follow
    TransformerLens: a stack is [components, batch, pos, d_model].
    """

    def __init__(self, model: LanguageModel, activations: dict[str, Tensor]) -> None:
        super().__init__(activations)
        self.model = model

    def __getitem__(self, key: str | tuple[str, int]) -> Tensor:
        if isinstance(key, tuple):
            short, layer = key
            key = act_name(short, layer + self._n_layers if layer < 0 else layer)
        elif key not in self and f"hook_{key}" in self:  # "embed", "pos_embed"
            key = f"hook_{key}"
        return super().__getitem__(key)

    def __repr__(self) -> str:
        """A summary, not megabytes of numbers: each name once with its shape, the names
        inside blocks folded over the blocks (`blocks.*.attn.hook_z`)."""
        shapes: dict[str, list[int]] = {}
        layers: set[int] = set()
        for name, value in self.items():
            parts = name.split(".")
            if parts[0] == "blocks":
                layers.add(int(parts[1]))
                name = ".".join(["blocks.*", *parts[2:]])
            shapes.setdefault(name, list(value.shape))
        span = f", * = blocks {min(layers)}..{max(layers)}" if layers else ""
        title = f"ActivationCache of {type(self.model.net).__name__}: {len(self)} activations"
        return "\n".join([title + span, *(f"  {name} {shape}" for name, shape in shapes.items())])

    @property
    def _n_layers(self) -> int:
        return self.model.config.layer_count

    def _layer(self, layer: int | None) -> int:
        """TransformerLens's convention: None or -1 is n_layers, after the last block."""
        return self._n_layers if layer is None or layer == -1 else layer

    def _stream(self, layer: int, mlp_input: bool = False) -> Tensor:
        """The residual stream that block `layer`'s first norm reads (its second with
        `mlp_input`); at layer n_layers, the final norm's input."""
        if layer == self._n_layers:
            name = act_name("resid_post", layer - 1)
        else:
            name = act_name("resid_mid" if mlp_input else "resid_pre", layer)
        if name not in self:
            raise KeyError(f"{name} is not in the cache (run_with_cache with it in `names`)")
        return self[name]

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: SliceInput = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """The residual stream before each block up to `layer` (and after the last block, by
        default): [components, B, T, C], labels "0_pre", "0_mid" (incl_mid), ..., "final_post".

        apply_ln at the end (the logit lens): the final norm itself on each component, its gain
        and bias included, so `@ model.W_U` gives each layer's logits (TransformerLens with
        fold_ln=False; its default fold_ln=True leaves the gain and bias to its folded W_U and
        b_U). Before block `layer`: as `apply_ln_to_stack`.
        """
        layer = self._layer(layer)
        parts: list[tuple[str, Tensor]] = []
        for i in range(layer + 1):
            if i == self._n_layers:
                parts.append(("final_post", self["resid_post", i - 1]))
                continue
            parts.append((f"{i}_pre", self["resid_pre", i]))
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append((f"{i}_mid", self["resid_mid", i]))
        stack = torch.stack([_slice(x, pos_slice, -2) for _, x in parts])  # (n, B, T, C)
        if apply_ln:
            recompute = layer == self._n_layers
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice, None, recompute)
        return (stack, [label for label, _ in parts]) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: SliceInput = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """What each part of the model wrote into the stream that enters block `layer` (the
        final norm by default): [components, B, T, C], which add up to that stream. Labels
        "embed", "pos_embed" (GPT-2), "0_attn_out", "0_mlp_out", ...; mode "attn" or "mlp"
        keeps one kind. apply_ln: as `apply_ln_to_stack`."""
        layer = self._layer(layer)
        parts: list[tuple[str, Tensor]] = []
        if incl_embeds:
            embeds = ("hook_embed", "hook_pos_embed")  # no pos_embed where positions rotate
            parts += [(name.removeprefix("hook_"), self[name]) for name in embeds if name in self]
        for i in range(layer):
            if mode != "mlp":
                parts.append((f"{i}_attn_out", self["attn_out", i]))
            if mode != "attn":
                parts.append((f"{i}_mlp_out", self["mlp_out", i]))
        if mlp_input and mode != "mlp":
            parts.append((f"{layer}_attn_out", self["attn_out", layer]))
        stack = torch.stack([_slice(x, pos_slice, -2) for _, x in parts])  # (n, B, T, C)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
        return (stack, [label for label, _ in parts]) if return_labels else stack

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: SliceInput = None,
        apply_ln: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """What each attention head of the blocks before `layer` wrote into the stream:
        [layer * n_heads, B, T, C], labels "L0H0", "L0H1", ... (+ "remainder", the rest of the
        stream, with incl_remainder). A head writes z_h @ W_O[h]; the output bias (GPT-2's
        b_O) is in no head, so it lands in the remainder. apply_ln: as `apply_ln_to_stack`.

        subtle: Gemma 3 normalizes the attention output after W_O (its post-attention norm),
        so there its heads' results do not add up to hook_attn_out (TransformerLens's neither).
        """
        layer = self._layer(layer)
        n_head = _attention(blocks(self.model.net)[0]).n_head
        heads = [_slice(self._head_results(i), pos_slice, -3) for i in range(layer)]
        labels = [f"L{i}H{h}" for i in range(layer) for h in range(n_head)]
        if heads:
            stack = torch.cat(heads, dim=-2).movedim(-2, 0)  # (layer*nh, B, T, C)
        else:  # layer 0: no heads yet, an empty stack of the stream's shape
            stack = _slice(self._stream(0), pos_slice, -2)[None][:0]
        if incl_remainder:
            remainder = _slice(self._stream(layer), pos_slice, -2) - stack.sum(0)
            stack = torch.cat([stack, remainder[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    @torch.inference_mode()
    def _head_results(self, layer: int) -> Tensor:
        """[B, T, nh, C]: what each head of block `layer` adds to the stream, z_h @ W_O[h]
        (TransformerLens's hook_result), from the cached z and the model's output matrix."""
        w_o = _out(blocks(self.model.net)[layer])[0]  # (nh, hs, C)
        return torch.einsum("bthd,hdc->bthc", self["z", layer], w_o.to(self["z", layer].dtype))

    @torch.inference_mode()
    def apply_ln_to_stack(
        self,
        residual_stack: Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: SliceInput = None,
        batch_slice: SliceInput = None,
        recompute_ln: bool = False,
    ) -> Tensor:
        """What each component of `residual_stack` [n, B, T, C] contributes after the norm
        before block `layer` (the final norm by default; `mlp_input`: the block's second norm):
        centred (LayerNorm) and divided by the scale that norm computed on the whole stream, as
        TransformerLens does. The gain is left out: its default fold_ln=True moves it into the
        next matrix (`logit_attrs` puts it back for W_U). `pos_slice` and `batch_slice` say
        which positions and rows of the stream the stack holds.

        recompute_ln, at the final norm: the norm itself on each component, with statistics of
        its own (the logit lens; `accumulated_resid(apply_ln=True)`).
        """
        layer = self._layer(layer)
        norm = final_norm(self.model.net)  # every norm of a model is of one kind and eps
        residual_stack = _slice(residual_stack, batch_slice, 1)
        if recompute_ln and layer == self._n_layers:
            return norm(residual_stack)
        stream = self._stream(layer, mlp_input)  # (B, T, C): what that norm read
        if isinstance(norm, gpt2.LayerNorm):
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
            stream = stream - stream.mean(-1, keepdim=True)
        scale = (stream.float().pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()  # (B, T, 1)
        scale = _slice(_slice(scale, pos_slice, -2), batch_slice, 0)
        return residual_stack / scale.to(residual_stack.dtype)

    @torch.inference_mode()
    def logit_attrs(
        self,
        residual_stack: Tensor,
        tokens: str | int | Tensor,
        incorrect_tokens: str | int | Tensor | None = None,
        pos_slice: SliceInput = None,
        batch_slice: SliceInput = None,
    ) -> Tensor:
        """Direct logit attribution: how much each component [n, B, T, C] of the stream adds
        to the logit of `tokens` (an id, a one-token text, or ids [B] or [B, T]), or to the
        logit difference `tokens` - `incorrect_tokens`: [n, B, T] (less the dims the slices
        drop). Each component is scaled as the final norm scaled the whole stream
        (`apply_ln_to_stack`), then read through the norm's gain and W_U.

        Components from `decompose_resid` add up to the logit less the norm's bias term (GPT-2:
        b_final @ W_U[:, token]). That is TransformerLens's default, fold_ln=True, where W_U
        holds the gain; its fold_ln=False leaves the gain out.
        """
        directions = self._directions(tokens)
        if incorrect_tokens is not None:
            wrong = self._directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise ValueError(
                    f"tokens {list(directions.shape[:-1])} and incorrect_tokens "
                    f"{list(wrong.shape[:-1])} must have one shape"
                )
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(residual_stack, -1, False, pos_slice, batch_slice)
        return (scaled * directions.to(scaled.dtype)).sum(-1)

    def _directions(self, tokens: str | int | Tensor) -> Tensor:
        """[*tokens.shape, C]: the direction in the normalized stream (before the gain) that
        raises each token's logit by one per unit, gain * W_U[:, token]."""
        if isinstance(tokens, str):
            tokens = self.model.to_single_token(tokens)
        net = self.model.net
        ids = torch.as_tensor(tokens, device=self.model.device)
        lm_head = net.lm_head.weight  # (V, C): row `token` is its column of W_U
        rows = lm_head.rows(ids) if isinstance(lm_head, PackedWeight) else lm_head[ids]
        return final_gain(net) * rows  # (*ids, C)


def _slice(x: Tensor, index: SliceInput, dim: int) -> Tensor:
    """`x` indexed along `dim` as TransformerLens's Slice does (see SliceInput)."""
    if index is None:
        return x
    if isinstance(index, tuple):
        index = slice(*index)
    elif isinstance(index, list):
        index = torch.tensor(index, device=x.device)
    return x[(slice(None),) * (dim % x.dim()) + (index,)]


def final_norm(net: nn.Module) -> nn.Module:
    return net.ln_f if hasattr(net, "ln_f") else net.norm


def final_gain(net: nn.Module) -> Tensor:
    """[C]: what the final norm multiplies the normalized stream by (Gemma stores it minus 1)."""
    norm = final_norm(net)
    weight = norm.weight.detach()
    return 1.0 + weight if isinstance(norm, gemma3.RMSNorm) else weight


# Weights ----------------------------------------------------------------------------------------
# TransformerLens's names and shapes, read from the modules as loaded: the checkpoint's own
# matrices, or packed ones dequantized back to float32 (kernels/packed.py `dense`), so they
# work with load(fast=True) too. Shapes: nh heads, hs head size, C d_model, V vocab.


def blocks(net: nn.Module) -> nn.ModuleList:
    return net.h if hasattr(net, "h") else net.layers


def _attention(block: nn.Module) -> nn.Module:
    return block.attn if hasattr(block, "attn") else block.self_attn


def _head_size(attn: nn.Module) -> int:
    return attn.head_size if hasattr(attn, "head_size") else attn.head_dim


def _dense(module: nn.Module) -> Tensor:
    """The matrix of a Linear ([out, in]) or an Embedding ([V, C]), packed or not."""
    w = module.weight
    return w.dense() if isinstance(w, PackedWeight) else w.detach()


def _linear(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight [out, in], bias [out]) of a Linear, packed or not, or of a packed model's
    q/k/v or gate/up (rows of the stacked matrix); a zero bias where the model has none, as
    TransformerLens gives b_* for every model."""
    if isinstance(module, RowSlice):
        w, b = _linear(module.stacked.linear)
        return w[module.rows], b[module.rows]
    w = _dense(module)
    return w, w.new_zeros(w.shape[0]) if module.bias is None else module.bias.detach()


def _projection(block: nn.Module, i: int) -> tuple[Tensor, Tensor]:
    """Weight [heads * hs, C] and bias of q (i=0), k (1) or v (2), however they are stored:
    GPT-2's c_attn, or Llama's and Gemma's q/k/v_proj."""
    attn = _attention(block)
    if not hasattr(attn, "c_attn"):
        return _linear((attn.q_proj, attn.k_proj, attn.v_proj)[i])
    w, b = _linear(attn.c_attn)  # rows of q, then k, then v
    return w.chunk(3)[i], b.chunk(3)[i]


def _heads(block: nn.Module, i: int) -> tuple[Tensor, Tensor]:
    """W [nh, C, hs] and b [nh, hs] of q, k or v. Grouped key/value heads are repeated for
    each query head of their group, as TransformerLens 3.9's W_K and W_V give them."""
    attn = _attention(block)
    w, b = _projection(block, i)
    hs = _head_size(attn)
    n = w.shape[0] // hs  # nh, or nkv for k and v
    w = w.view(n, hs, -1).transpose(1, 2)  # (n*hs, C) -> (n, C, hs)
    repeat = attn.n_head // n
    return w.repeat_interleave(repeat, dim=0), b.view(n, hs).repeat_interleave(repeat, dim=0)


def _out(block: nn.Module) -> tuple[Tensor, Tensor]:
    """W_O [nh, hs, C], head h's rows of the output matrix, and b_O [C]."""
    attn = _attention(block)
    w, b = _linear(attn.c_proj if hasattr(attn, "c_proj") else attn.o_proj)  # (C, nh*hs)
    return w.view(len(w), attn.n_head, _head_size(attn)).permute(1, 2, 0), b  # (nh, hs, C)


def _mlp_in(block: nn.Module) -> tuple[Tensor | None, Tensor, Tensor]:
    """(W_gate, W_in, b_in) as [out, in] and [out]: GPT-2's c_fc (no gate), or the gated
    MLP's gate and up (Llama, Gemma 3)."""
    mlp = block.mlp
    if hasattr(mlp, "c_fc"):
        return None, *_linear(mlp.c_fc)
    return _linear(mlp.gate_proj)[0], *_linear(mlp.up_proj)


def _mlp_out(block: nn.Module) -> tuple[Tensor, Tensor]:
    return _linear(block.mlp.c_proj if hasattr(block.mlp, "c_fc") else block.mlp.down_proj)


def _zeros(net: nn.Module, size: str) -> Tensor:
    return final_norm(net).weight.new_zeros(getattr(net.config, size))


def _embedding(net: nn.Module) -> Tensor:
    """W_E [V, C]: the rows the residual stream starts from. Gemma multiplies them by
    sqrt(C) (rounded to the model's dtype, as it runs), and TransformerLens's W_E holds that."""
    if hasattr(net, "wte"):
        return _dense(net.wte)
    w = _dense(net.embed_tokens)
    if isinstance(net, gemma3.Gemma3):
        return w * torch.tensor(net.config.hidden_size**0.5, dtype=w.dtype)
    return w


def _positions(net: nn.Module) -> Tensor:
    if not hasattr(net, "wpe"):
        raise AttributeError(
            f"W_pos: {type(net).__name__} has no learned positions (rotary: they turn q and k)"
        )
    return _dense(net.wpe)


# name -> (shape, how one block's is read); the model's is every block's, stacked.
LAYER_WEIGHTS: dict[str, tuple[str, Callable[[nn.Module], Tensor | None]]] = {
    "W_Q": ("[n_layers, n_heads, d_model, d_head]", lambda block: _heads(block, 0)[0]),
    "W_K": ("[n_layers, n_heads, d_model, d_head]", lambda block: _heads(block, 1)[0]),
    "W_V": ("[n_layers, n_heads, d_model, d_head]", lambda block: _heads(block, 2)[0]),
    "W_O": ("[n_layers, n_heads, d_head, d_model]", lambda block: _out(block)[0]),
    "b_Q": ("[n_layers, n_heads, d_head]", lambda block: _heads(block, 0)[1]),
    "b_K": ("[n_layers, n_heads, d_head]", lambda block: _heads(block, 1)[1]),
    "b_V": ("[n_layers, n_heads, d_head]", lambda block: _heads(block, 2)[1]),
    "b_O": ("[n_layers, d_model]", lambda block: _out(block)[1]),
    "W_in": ("[n_layers, d_model, d_mlp]", lambda block: _mlp_in(block)[1].T),
    "W_gate": (
        "[n_layers, d_model, d_mlp] (None without a gated MLP)",
        lambda block: None if (gate := _mlp_in(block)[0]) is None else gate.T,
    ),
    "W_out": ("[n_layers, d_mlp, d_model]", lambda block: _mlp_out(block)[0].T),
    "b_in": ("[n_layers, d_mlp]", lambda block: _mlp_in(block)[2]),
    "b_out": ("[n_layers, d_model]", lambda block: _mlp_out(block)[1]),
}
MODEL_WEIGHTS: dict[str, tuple[str, Callable[[nn.Module], Tensor]]] = {
    "W_E": ("[d_vocab, d_model]", _embedding),
    "W_pos": ("[n_ctx, d_model], GPT-2 only", _positions),
    "W_U": ("[d_model, d_vocab]", lambda net: _dense(net.lm_head).T),
    "b_U": ("[d_vocab], zeros: no model here has one", lambda net: _zeros(net, "vocab_size")),
}


@torch.no_grad()
def weight(net: nn.Module, name: str) -> Tensor | None:
    """TransformerLens's weight `name` of `net` in its shape. Example: weight(net, "W_O")."""
    if name in MODEL_WEIGHTS:
        return MODEL_WEIGHTS[name][1](net)
    per_block = [LAYER_WEIGHTS[name][1](block) for block in blocks(net)]
    return None if per_block[0] is None else torch.stack(per_block)


def weight_alias(name: str) -> property:
    """A read-only `LanguageModel` property giving `weight(model.net, name)`."""
    shape = {**LAYER_WEIGHTS, **MODEL_WEIGHTS}[name][0]
    return property(lambda model: weight(model.net, name), doc=f"TransformerLens's {name}, {shape}")
