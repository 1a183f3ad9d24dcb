"""Named activations: every value a model computes can be read, or replaced, while it runs.

Names are TransformerLens's (`blocks.3.attn.hook_pattern`), so its tutorials read on our
models. Each model owns one `Hooks`; its modules call `hook("hook_q", q)` at every named point.
While nobody listens (generation) `Hooks.fn` is None and a point costs one attribute test.

Example:
    hook = HookPoint(hooks, "blocks.0.attn.")
    q = hook("hook_q", q)  # hooks.fn("blocks.0.attn.hook_q", q) when set, else q unchanged
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

# fn(name, value) -> the value to go on with (the same tensor, or a replacement).
HookFn = Callable[[str, Tensor], Tensor]


class Hooks:
    """What happens at a model's named points; one instance shared by all its modules."""

    def __init__(self) -> None:
        self.fn: HookFn | None = None


class HookPoint:
    """The named points of one module (`prefix` + name), handed to the model's `Hooks`."""

    def __init__(self, hooks: Hooks, prefix: str) -> None:
        self.hooks, self.prefix = hooks, prefix

    def __call__(self, name: str, x: Tensor) -> Tensor:
        fn = self.hooks.fn
        return x if fn is None else fn(self.prefix + name, x)

    @property
    def listening(self) -> bool:
        """True while a hook function runs: the written-out math must then run too, since
        the fast kernels (SDPA, fused layer norm) never form the values a hook asks for."""
        return self.hooks.fn is not None
