"""The recurrent mixers share one code path, ``_mix``, for forward, prefill and decoding steps.

Each has a fixed-size state ``S`` written by keys from the context stream and read by queries from
the ``x`` stream (the same stream in the self patterns). A mixer supplies:

- ``_stream(inp, mask, conv_state, convolve) -> (features, conv_state)``: every per-position
  feature of one input stream (queries, keys, values, gates, output gates), with padded positions
  writing nothing. ``convolve=False`` skips the short convolution: in the cross patterns the
  query stream stays position-local (``y_i`` sees ``x_i`` only, and the context);
- ``_op(fq, fkv, pattern, initial_state, output_final_state) -> (o, S)``: the mixing op;
- ``_read(fq, S) -> o``: queries reading a fixed state (noncausal cross decoding);
- ``_out(o, fq) -> y``; ``_zero_state(batch_size)``.
"""

from __future__ import annotations

import torch

from seqmix.mixers.base import Mixer, State
from seqmix.patterns import Pattern


class RecurrentMixer(Mixer):
    """A mixer with a fixed-size recurrent state; see the module docstring."""

    recurrent = True

    def _forward(self, x, context, pattern, mask, context_mask):
        return self._mix(x, context, pattern, mask, context_mask, None)[0]

    def _init_state(self, batch_size, context):
        state = self._zero_state(batch_size)
        if context is None:
            return state
        _, filled = self._mix(context, None, Pattern.CAUSAL_SELF, None, None, self._zero_state(batch_size))
        return {**state, "S": filled["S"], "memory": True}

    def _step(self, x_t, state, context_t):
        if state.get("memory"):
            pattern = Pattern.NONCAUSAL_CROSS
        else:
            pattern = Pattern.CAUSAL_SELF if context_t is None else Pattern.CAUSAL_CROSS
        context = None if context_t is None else context_t[:, None]
        y, state = self._mix(x_t[:, None], context, pattern, None, None, state)
        return y[:, 0], state

    def prefill(self, x, state, *, context=None, mask=None):
        """The parallel (chunked) form started from ``state``; padded positions write nothing and
        decay nothing (zero keys and gates, as in ``forward``)."""
        mask = self._check_prefill(x, state, context, mask)
        pattern = Pattern.CAUSAL_SELF if context is None else Pattern.CAUSAL_CROSS
        return self._mix(x, context, pattern, mask, None if context is None else mask, state)

    def _mix(self, x, context, pattern: Pattern, mask, context_mask, state: State | None):
        fq, conv = self._stream(x, mask, None if state is None else state.get("conv"), not pattern.cross)
        fq = _in_compute_dtype(fq, x)
        new: State | None = None if state is None else {**state, "conv": conv}
        if state is not None and state.get("memory"):
            o = self._read(fq, state["S"])
        else:
            fkv = fq
            if pattern.cross:
                fkv, conv_ctx = self._stream(context, context_mask, None if state is None else state.get("conv_ctx"), True)
                fkv = _in_compute_dtype(fkv, x)
                if new is not None:
                    new["conv_ctx"] = conv_ctx
            o, S = self._op(fq, fkv, pattern, None if state is None else state["S"], state is not None)
            if new is not None:
                new["S"] = S
        return self._out(o, fq), new

    def _op_backend(self, length: int) -> str:
        """A single token runs as one step of the recurrence: with ``"auto"`` on CUDA, the op's
        fused Triton step kernel where it has one; otherwise the reference recurrence (the chunked
        form of one token is the same sum at the cost of a whole chunk: 25 ms and 14 GB for a Mamba
        step at batch 64 on the H100). ``"reference"`` and ``"triton"`` are kept as named."""
        if length != 1 or self.backend in ("reference", "triton"):
            return self.backend
        on_cuda = any(p.is_cuda for p in self.parameters())
        return "auto" if self.backend == "auto" and on_cuda and "triton" in self.backends else "reference"

    def state_size(self, seq_len: int) -> int:
        state = self._zero_state(1)
        return sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))

    def _stream(self, inp, mask, conv_state, convolve):
        raise NotImplementedError

    def _op(self, fq, fkv, pattern, initial_state, output_final_state):
        raise NotImplementedError

    def _read(self, fq, S):
        raise NotImplementedError

    def _out(self, o, fq):
        raise NotImplementedError

    def _zero_state(self, batch_size: int) -> State:
        raise NotImplementedError


def _in_compute_dtype(features: dict, x: torch.Tensor) -> dict:
    """Features in one dtype for the op: autocast's where it is on (its matrix products give that
    dtype while softplus and friends give float32), else ``x``'s."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return {key: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for key, t in features.items()}
