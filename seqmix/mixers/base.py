"""The mixer protocol: one ``nn.Module`` interface for every token mixer, in the four patterns.

A mixer maps ``x [B, T, d_model]`` to ``y [B, T, d_model]``:

- ``forward(x, context=None, *, causal=False, mask=None, context_mask=None)``: ``context=None`` is
  self-attention; otherwise cross-attention over ``context [B, T_ctx, d_model]`` (causal cross needs
  ``T_ctx == T``). ``mask [B, T]`` / ``context_mask [B, T_ctx]`` are bool, True at real tokens:
  padded positions change no output at a real position.
- ``init_state(batch_size, *, context=None)`` and ``step(x_t, state, *, context_t=None)``: decoding
  one token at a time, equal to the parallel forward. Causal self: no context. Causal cross: the
  aligned ``context_t [B, d_model]`` at every step. Noncausal cross (a decoder reading an encoder):
  ``init_state(..., context=...)`` reads the whole context once; steps take no ``context_t``.
- ``state_size(seq_len)``: elements of causal-self decoding state per sequence.

Subclasses set ``patterns`` and ``backends`` and implement ``_forward``, ``_init_state`` and
``_step``; the checks of this class run first, so subclasses see valid input only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from seqmix.patterns import Pattern

State = dict[str, Any]


class Mixer(nn.Module):
    """Base class of all token mixers (see the module docstring for the protocol)."""

    name: ClassVar[str] = ""
    patterns: ClassVar[frozenset[Pattern]] = frozenset()
    backends: ClassVar[tuple[str, ...]] = ("reference", "chunked")
    recurrent: ClassVar[bool] = True  # constant-size decoding state

    def __init__(self, d_model: int, n_heads: int = 4):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"{self.name}: d_model must be a positive int, got {d_model!r}")
        if not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"{self.name}: n_heads must be a positive int dividing d_model={d_model}, got {n_heads!r}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads

    # -- the public protocol -------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [B, T, d_model]`` -> ``y [B, T, d_model]`` in the pattern given by ``causal`` and ``context``."""
        pattern = Pattern.of(causal=causal, cross=context is not None)
        self.check_pattern(pattern)
        self._check_seq("x", x)
        mask = self._check_mask("mask", mask, x)
        if context is None:
            context, context_mask = x, mask
        else:
            self._check_context(x, context, aligned=causal)
            context_mask = self._check_mask("context_mask", context_mask, context)
        return self._forward(x, context, pattern, mask, context_mask)

    def init_state(self, batch_size: int, *, context: torch.Tensor | None = None) -> State:
        """The decoding state before the first token (causal self or causal cross), or, given the
        whole ``context``, the state for noncausal cross decoding."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be a positive int, got {batch_size!r}")
        if context is not None:
            self.check_pattern(Pattern.NONCAUSAL_CROSS)
            self._check_seq("context", context)
            if context.shape[0] != batch_size:
                raise ValueError(f"{self.name}: context has batch {context.shape[0]}, expected batch_size={batch_size}")
        elif not self.patterns & {Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS}:
            raise ValueError(f"{self.name} has no causal pattern, so no step-by-step decoding")
        return self._init_state(batch_size, context)

    def step(self, x_t: torch.Tensor, state: State, *, context_t: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """One decoding step: ``x_t [B, d_model]`` -> ``(y_t [B, d_model], new state)``."""
        if not isinstance(state, dict):
            raise TypeError(f"{self.name}: state must be the dict returned by init_state, got {type(state).__name__}")
        self._check_token("x_t", x_t)
        if context_t is not None:
            self.check_pattern(Pattern.CAUSAL_CROSS)
            self._check_token("context_t", context_t, like=x_t)
            if state.get("memory") is not None:
                raise ValueError(f"{self.name}: this state was built for noncausal cross decoding; pass no context_t")
        elif state.get("memory") is None:
            self.check_pattern(Pattern.CAUSAL_SELF)
        return self._step(x_t, state, context_t)

    def prefill(
        self, x: torch.Tensor, state: State, *, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State]:
        """Causal forward of ``x [B, T, d_model]`` continuing from ``state``: ``(y, new state)``.

        Equal to stepping through ``x`` one token at a time (``context`` is the aligned context for
        causal cross). ``mask [B, T]`` (bool, True at real tokens) acts as in ``forward``: padded
        positions change nothing at real positions, now or in later steps; their own outputs are
        meaningless. This default steps (a padded position leaves the state as it was: every state
        tensor must be ``[B, ...]``); mixers override it with their parallel form.
        """
        self._check_seq("x", x)
        if context is not None:
            self._check_context(x, context, aligned=True)
        mask = self._check_mask("mask", mask, x)
        ys = []
        for t in range(x.shape[1]):
            y_t, new = self.step(x[:, t], state, context_t=None if context is None else context[:, t])
            state = new if mask is None else _keep_where_padded(mask[:, t], new, state)
            ys.append(y_t)
        return torch.stack(ys, dim=1), state

    def state_size(self, seq_len: int) -> int:
        """Elements of causal-self decoding state per sequence after ``seq_len`` tokens."""
        raise NotImplementedError

    def check_pattern(self, pattern: Pattern) -> None:
        if pattern not in self.patterns:
            served = ", ".join(p.value for p in Pattern if p in self.patterns)
            raise ValueError(f"mixer {self.name!r} does not serve the {pattern.value} pattern; it serves: {served}")

    # -- for subclasses --------------------------------------------------------------------
    def _forward(self, x, context, pattern: Pattern, mask, context_mask) -> torch.Tensor:
        raise NotImplementedError

    def _init_state(self, batch_size: int, context: torch.Tensor | None) -> State:
        raise NotImplementedError

    def _step(self, x_t, state: State, context_t) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}"

    # -- checks ------------------------------------------------------------------------------
    def _check_seq(self, name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.name}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3 or t.shape[-1] != self.d_model:
            raise ValueError(f"{self.name}: {name} must have shape [batch, time, {self.d_model}], got {list(t.shape)}")
        if t.shape[1] == 0:
            raise ValueError(f"{self.name}: {name} must not be empty (time dimension is 0)")
        if not t.is_floating_point():
            raise TypeError(f"{self.name}: {name} must be floating point, got {t.dtype}")
        if like is not None:
            if t.shape[0] != like.shape[0]:
                raise ValueError(f"{self.name}: {name} has batch {t.shape[0]}, expected {like.shape[0]} (the batch of x)")
            if t.device != like.device or t.dtype != like.dtype:
                raise ValueError(f"{self.name}: {name} is {t.dtype} on {t.device}, expected {like.dtype} on {like.device} (as x)")

    def _check_context(self, x: torch.Tensor, context: torch.Tensor, *, aligned: bool) -> None:
        self._check_seq("context", context, like=x)
        if aligned and context.shape[1] != x.shape[1]:
            raise ValueError(f"{self.name}: causal cross needs aligned sequences, x has length {x.shape[1]} and context {context.shape[1]}")

    def _check_prefill(self, x: torch.Tensor, state: State, context: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The arguments of a parallel ``prefill`` (``state`` a causal one from ``init_state``);
        returns the checked ``mask``."""
        self._check_seq("x", x)
        if context is not None:
            self._check_context(x, context, aligned=True)
        mask = self._check_mask("mask", mask, x)
        if not isinstance(state, dict) or state.get("memory") is not None:
            raise ValueError(f"{self.name}: prefill continues a causal state from init_state(batch_size), not a noncausal cross one")
        return mask

    def _check_token(self, name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.name}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[-1] != self.d_model:
            raise ValueError(f"{self.name}: {name} must have shape [batch, {self.d_model}], got {list(t.shape)}")
        if like is not None and t.shape[0] != like.shape[0]:
            raise ValueError(f"{self.name}: {name} has batch {t.shape[0]}, expected {like.shape[0]} (the batch of x_t)")

    def _check_mask(self, name: str, mask: torch.Tensor | None, seq: torch.Tensor) -> torch.Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(seq.shape[:2]):
            got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{self.name}: {name} must be a bool tensor of shape {list(seq.shape[:2])}, got {got}")
        if mask.device != seq.device:
            raise ValueError(f"{self.name}: {name} is on {mask.device}, expected {seq.device}")
        return mask


def _keep_where_padded(real: torch.Tensor, new: State, old: State) -> State:
    """``new`` for the sequences where ``real [B]`` is True, ``old`` elsewhere, tensor by tensor."""
    out = {}
    for key, value in new.items():
        if isinstance(value, torch.Tensor):
            keep = real.view(-1, *([1] * (value.dim() - 1)))
            value = torch.where(keep, value, old[key])
        out[key] = value
    return out
