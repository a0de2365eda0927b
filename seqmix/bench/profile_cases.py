"""What the profiler measures: seqmix ops, seqmix mixers and peers, each as a ``Case``.

A case builds, for one ``Shape``, a ``Run``: random inputs (never zeros) and the call to time.
Ops are found by name in ``seqmix.ops`` and mixers in the registry, so ops and mixers that land
later are profiled once they exist; those asked for but absent are reported, not skipped.

The backend of every case is explicit and recorded: a case passes its backend by name. Where a
case stands for ``"auto"``, the profiler resolves it first: softmax attention by its own rule
(FlexAttention for sliding windows on CUDA, else SDPA); the other ops by
``seqmix.ops._checks.resolve_backend`` over the backends the op accepts (probed at a tiny size);
mixers by the same rules over their class's ``backends``. On CUDA in half precision the SDPA
baselines run under ``sdpa_kernel(FLASH_ATTENTION)`` and say so (``sdpa-flash``).

Shapes: ops take ``[B, T, H, D]`` (channels ``C = H * D`` for ``selective_scan`` and
``long_conv``, with ``N = 16`` states per channel); mixers take ``x [B, T, H * D]`` with ``H``
heads. Cross patterns read a context as long as the query.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import seqmix.ops
from seqmix.bench.backends import mixer_backend, softmax_auto
from seqmix.mixers import build_mixer, list_mixers, mixer_class, mixer_options
from seqmix.mixers.recurrent import RecurrentMixer
from seqmix.ops._checks import resolve_backend
from seqmix.patterns import ALL_PATTERNS, Pattern

SSM_STATES = 16
CAUSAL_AND_SELF_ALIGNED = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS})
CAUSAL = frozenset({Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS})


@dataclass(frozen=True)
class Shape:
    """One measured point: ``batch`` sequences of ``length`` tokens (for ``step``, the context
    length), ``heads`` of ``head_dim``; ``grad``: inputs and parameters take gradients."""

    pattern: Pattern
    batch: int
    length: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    grad: bool
    window: int

    @property
    def d_model(self) -> int:
        return self.heads * self.head_dim


@dataclass
class Run:
    """The call to measure: ``forward()`` returns the output (the tensor to back-propagate from).

    ``inputs``: every tensor alive before the call that it reads (inputs, parameters, state);
    ``leaves``: those that receive gradients; ``state_bytes``: the decoding state's bytes (step).
    """

    forward: Callable[[], torch.Tensor]
    inputs: list[torch.Tensor]
    leaves: list[torch.Tensor]
    state_bytes: int | None = None


@dataclass(frozen=True)
class Case:
    """A thing to profile. ``level``: ``op``, ``mixer`` or ``peer``; ``role``: ``plain`` or
    ``sdpa`` for the two baselines of a level, else empty; ``counterpart``: for a peer, the label
    of the seqmix op it is compared with."""

    level: str
    name: str
    variant: str
    backend: str
    patterns: frozenset[Pattern]
    make: Callable[[Shape], Run]
    make_step: Callable[[Shape], Run] | None = None
    role: str = ""
    counterpart: str = ""
    step_backend: str = ""  # the backend of the step form, where it differs

    def backend_in(self, mode: str) -> str:
        return self.step_backend if mode == "step" and self.step_backend else self.backend

    @property
    def label(self) -> str:
        return f"{self.name}/{self.variant}" if self.variant else self.name


@dataclass(frozen=True)
class Unavailable:
    """Something asked for that cannot be measured here (in ``mode``, or at all), and why."""

    level: str
    name: str
    reason: str
    mode: str = ""


@dataclass
class CaseSet:
    cases: list[Case] = field(default_factory=list)
    unavailable: list[Unavailable] = field(default_factory=list)


# -- random inputs -----------------------------------------------------------------------------


def _leaf(t: torch.Tensor, s: Shape) -> torch.Tensor:
    return t.to(s.dtype).detach().requires_grad_(s.grad)


def _randn(s: Shape, *shape: int) -> torch.Tensor:
    return _leaf(torch.randn(*shape, device=s.device), s)


def _qkv(s: Shape, length: int | None = None) -> list[torch.Tensor]:
    T = s.length if length is None else length
    return [_randn(s, s.batch, T, s.heads, s.head_dim) for _ in range(3)]


def _log_gate(s: Shape, T: int, per_channel: bool) -> torch.Tensor:
    """A log forget gate ``log sigmoid(N(0, 1))`` (< 0): ``[B, T, H]`` or ``[B, T, H, D]``."""
    shape = (s.batch, T, s.heads, s.head_dim) if per_channel else (s.batch, T, s.heads)
    return _leaf(F.logsigmoid(torch.randn(*shape, device=s.device)), s)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _run(fn: Callable[[], Any], inputs: list[torch.Tensor | None], state_bytes: int | None = None) -> Run:
    tensors = [t for t in inputs if t is not None]
    return Run(lambda: _first(fn()), tensors, [t for t in tensors if t.requires_grad], state_bytes)


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- backends ----------------------------------------------------------------------------------


def uses_flash(device: torch.device, dtype: torch.dtype) -> bool:
    """The SDPA baselines are pinned to FlashAttention on CUDA in half precision."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def sdpa_context(pin_flash: bool) -> contextlib.AbstractContextManager:
    if not pin_flash:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def probe_backends(op: str, make: Callable[[str], Callable[[Shape], Run]], candidates: tuple[str, ...], tiny: Shape) -> tuple[str, ...]:
    """The candidates that ``op`` accepts: each is called once at the ``tiny`` shape; a backend
    the op refuses as not available is left out, any other failure shows later in the sweep."""
    accepted = []
    for backend in candidates:
        try:
            with torch.no_grad():
                make(backend)(tiny).forward()
        except ValueError as e:
            if "not available" in str(e):
                continue
        except Exception:  # noqa: BLE001  (the real cases record the error)
            pass
        accepted.append(backend)
    if not accepted:
        raise ValueError(f"{op}: none of the backends {candidates} is accepted")
    return tuple(accepted)


# -- ops ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """How to call one op variant: ``build(fn, backend)`` -> a maker of runs for a shape;
    ``step(fn, backend)`` -> a maker of one-token decoding runs, or None."""

    op: str
    variant: str
    patterns: frozenset[Pattern]
    candidates: tuple[str, ...]
    build: Callable[[Callable, str], Callable[[Shape], Run]]
    step: Callable[[Callable, str], Callable[[Shape], Run]] | None = None


def _softmax(window: bool, pin_flash: bool):
    def build(fn, backend):
        def make(s: Shape) -> Run:
            q, k, v = _qkv(s)

            def call():
                with sdpa_context(pin_flash):
                    return fn(q, k, v, causal=s.pattern.causal, window=s.window if window else None, backend=backend)

            return _run(call, [q, k, v])

        return make

    def step(fn, backend):
        def make(s: Shape) -> Run:
            (q,) = _qkv(s, 1)[:1]
            held = min(s.length, s.window) if window else s.length  # a window's cache keeps w entries
            _, k, v = _qkv(s, held)

            def call():
                with sdpa_context(pin_flash):
                    return fn(q, k, v, causal=False, backend=backend)

            return _run(call, [q, k, v], _nbytes([k, v]))

        return make

    return build, step


def _linear(fn, backend):
    def make(s: Shape) -> Run:
        q, k, v = _qkv(s)
        return _run(lambda: fn(q, k, v, causal=s.pattern.causal, backend=backend), [q, k, v])

    return make


def _gla(gate: str):
    def build(fn, backend):
        def make(s: Shape) -> Run:
            q, k, v = _qkv(s)
            g = None if gate == "none" else _log_gate(s, s.length, gate == "channel")
            return _run(lambda: fn(q, k, v, g, causal=s.pattern.causal, cross=s.pattern.cross, backend=backend), [q, k, v, g])

        return make

    def step(fn, backend):
        def make(s: Shape) -> Run:
            q, k, v = _qkv(s, 1)
            g = None if gate == "none" else _log_gate(s, 1, gate == "channel")
            state = torch.rand(s.batch, s.heads, s.head_dim, s.head_dim, device=s.device)  # float32, as accumulated
            call = lambda: fn(q, k, v, g, causal=True, initial_state=state, output_final_state=True, backend=backend)  # noqa: E731
            return _run(call, [q, k, v, g, state], _nbytes([state]))

        return make

    return build, step


def _delta_inputs(s: Shape, T: int, gated: bool) -> list[torch.Tensor | None]:
    q, _, v = _qkv(s, T)
    k = _leaf(F.normalize(torch.randn(s.batch, T, s.heads, s.head_dim, device=s.device), dim=-1), s)
    beta = _leaf(torch.sigmoid(torch.randn(s.batch, T, s.heads, device=s.device)), s)
    g = _log_gate(s, T, False) if gated else None
    return [q, k, v, beta, g]


def _delta(gated: bool):
    def build(fn, backend):
        def make(s: Shape) -> Run:
            q, k, v, beta, g = _delta_inputs(s, s.length, gated)
            call = lambda: fn(q, k, v, beta, g=g, causal=s.pattern.causal, cross=s.pattern.cross, backend=backend)  # noqa: E731
            return _run(call, [q, k, v, beta, g])

        return make

    def step(fn, backend):
        def make(s: Shape) -> Run:
            q, k, v, beta, g = _delta_inputs(s, 1, gated)
            state = torch.rand(s.batch, s.heads, s.head_dim, s.head_dim, device=s.device)
            call = lambda: fn(q, k, v, beta, g=g, causal=True, initial_state=state, output_final_state=True, backend=backend)  # noqa: E731
            return _run(call, [q, k, v, beta, g, state], _nbytes([state]))

        return make

    return build, step


def _ssm_inputs(s: Shape, T: int) -> list[torch.Tensor]:
    C, N, dev = s.d_model, SSM_STATES, s.device
    u = _randn(s, s.batch, T, C)
    delta = _leaf(F.softplus(torch.randn(s.batch, T, C, device=dev) - 3), s)
    A = _leaf(-torch.exp(0.5 * torch.randn(C, N, device=dev)), s)
    Bm, Cm = _randn(s, s.batch, T, N), _randn(s, s.batch, T, N)
    D = _randn(s, C)
    return [u, delta, A, Bm, Cm, D]


def _ssm_build(fn, backend):
    def make(s: Shape) -> Run:
        u, delta, A, Bm, Cm, D = _ssm_inputs(s, s.length)
        call = lambda: fn(u, delta, A, Bm, Cm, D, causal=s.pattern.causal, cross=s.pattern.cross, backend=backend)  # noqa: E731
        return _run(call, [u, delta, A, Bm, Cm, D])

    return make


def _ssm_step(fn, backend):
    def make(s: Shape) -> Run:
        u, delta, A, Bm, Cm, D = _ssm_inputs(s, 1)
        state = torch.rand(s.batch, s.d_model, SSM_STATES, device=s.device)
        call = lambda: fn(u, delta, A, Bm, Cm, D, causal=True, initial_state=state, output_final_state=True, backend=backend)  # noqa: E731
        return _run(call, [u, delta, A, Bm, Cm, D, state], _nbytes([state]))

    return make


def _long_conv(fn, backend):
    def make(s: Shape) -> Run:
        u = _randn(s, s.batch, s.length, s.d_model)
        taps = s.length if s.pattern.causal else 2 * s.length - 1
        kernel = _leaf(torch.randn(s.d_model, taps, device=s.device) * taps**-0.5, s)
        return _run(lambda: fn(u, kernel, causal=s.pattern.causal, backend=backend), [u, kernel])

    return make


LINEAR_BACKENDS = ("reference", "chunked", "triton")


def op_specs(pin_flash: bool) -> list[OpSpec]:
    """Every op variant the profiler knows, in report order (the two baselines first)."""
    full, full_step = _softmax(False, pin_flash)
    win, win_step = _softmax(True, False)
    specs = [
        OpSpec("softmax_attention", "full", ALL_PATTERNS, ("reference", "sdpa"), full, full_step),
        OpSpec("softmax_attention", "window", ALL_PATTERNS, ("auto",), win, win_step),
        OpSpec("linear_attention", "elu", ALL_PATTERNS, LINEAR_BACKENDS, _linear),
    ]
    for gate in ("head", "channel", "none"):
        build, step = _gla(gate)
        specs.append(OpSpec("gated_linear_attention", f"{gate}_gate" if gate != "none" else "no_gate", ALL_PATTERNS, LINEAR_BACKENDS, build, step))
    for gated in (False, True):
        build, step = _delta(gated)
        specs.append(OpSpec("delta_rule", "gate" if gated else "no_gate", ALL_PATTERNS, LINEAR_BACKENDS, build, step))
    specs.append(OpSpec("selective_scan", "", ALL_PATTERNS, LINEAR_BACKENDS, _ssm_build, _ssm_step))
    specs.append(OpSpec("long_conv", "", CAUSAL_AND_SELF_ALIGNED, ("reference", "fft", "triton"), _long_conv))
    return specs


OP_NAMES = ("softmax_attention", "linear_attention", "gated_linear_attention", "delta_rule", "selective_scan", "long_conv")


def op_cases(names: list[str], tiny: Shape) -> CaseSet:
    """The cases of the ops in ``names`` (plus the two softmax baselines, always), resolved for
    ``tiny``'s device and dtype; ops absent from ``seqmix.ops`` are listed as unavailable."""
    unknown = sorted(set(names) - set(OP_NAMES))
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; the profiler knows {list(OP_NAMES)}")
    pin_flash = uses_flash(tiny.device, tiny.dtype)
    out = CaseSet()
    for name in sorted(set(names) - {n for n in OP_NAMES if hasattr(seqmix.ops, n)}, key=OP_NAMES.index):
        out.unavailable.append(Unavailable("op", name, "not in seqmix.ops on this revision"))
    for spec in op_specs(pin_flash):
        fn = getattr(seqmix.ops, spec.op, None)
        if fn is None or (spec.op not in names and not (spec.op == "softmax_attention" and spec.variant == "full")):
            continue
        if spec.op == "softmax_attention" and spec.variant == "full":
            for backend, role in (("reference", "plain"), ("sdpa", "sdpa")):
                label = "sdpa-flash" if backend == "sdpa" and pin_flash else backend
                out.cases.append(Case("op", spec.op, spec.variant, label, spec.patterns, spec.build(fn, backend), spec.step(fn, backend), role))
            continue
        if spec.candidates == ("auto",):
            backend = softmax_auto(tiny.device, windowed=True)
            step_backend = softmax_auto(tiny.device, windowed=False)  # one query reads the window's whole ring
        else:
            accepted = probe_backends(spec.op, lambda b, spec=spec, fn=fn: spec.build(fn, b), spec.candidates, tiny)
            backend = resolve_backend(spec.op, "auto", accepted, tiny.device)
            step_backend = "triton" if backend == "triton" else "reference"  # T = 1: the fused step kernel, or the recurrence itself
        step = spec.step(fn, step_backend) if spec.step else None
        out.cases.append(Case("op", spec.op, spec.variant, backend, spec.patterns, spec.build(fn, backend), step, step_backend=step_backend))
    return out


# -- mixers ------------------------------------------------------------------------------------


def _random_like(t: torch.Tensor) -> torch.Tensor:
    return torch.rand(t.shape, dtype=t.dtype, device=t.device) if (t.is_floating_point() or t.is_complex()) else t


def _random_state(state: Any) -> Any:
    """The same structure with every tensor drawn at random (same shape and dtype)."""
    if isinstance(state, dict):
        return {key: _random_state(value) for key, value in state.items()}
    if isinstance(state, (tuple, list)):
        return type(state)(_random_state(value) for value in state)
    return _random_like(state) if isinstance(state, torch.Tensor) else state


def grown_state(mixer: torch.nn.Module, batch: int, length: int) -> dict:
    """A causal-self decoding state as after ``length`` tokens.

    A recurrent mixer's state has a fixed size: it is drawn at random in the shapes of
    ``init_state`` rather than stepped through ``length`` tokens (its step costs the same either
    way). A growing state (a KV cache, a window's ring, Hyena's history) is filled by ``prefill``
    (the mixer's parallel form) on ``length`` random tokens.
    """
    p = next(mixer.parameters())
    with torch.no_grad():
        if isinstance(mixer, RecurrentMixer):
            return _random_state(mixer.init_state(batch))
        x = torch.randn(batch, length, mixer.d_model, device=p.device, dtype=p.dtype)
        return mixer.prefill(x, mixer.init_state(batch))[1]


def _state_tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, dict):
        return [t for v in state.values() for t in _state_tensors(v)]
    if isinstance(state, (tuple, list)):
        return [t for v in state for t in _state_tensors(v)]
    return [state] if isinstance(state, torch.Tensor) else []


def mixer_cases(names: list[str], *, device: torch.device, dtype: torch.dtype, window: int, seed: int = 0) -> CaseSet:
    """The cases of the mixers in ``names`` plus the softmax mixer as the two baselines (plain
    attention with the reference backend, and SDPA). Mixers are built with ``d_model = H * D``,
    ``n_heads = H``, their default options, and ``window`` for mixers with a sliding window."""
    registered = list_mixers()
    unknown = sorted(set(names) - set(registered))
    if unknown:
        raise ValueError(f"unknown mixer(s) {unknown}; registered mixers: {', '.join(registered)}")
    pin_flash = uses_flash(device, dtype)
    out = CaseSet()
    for name in ["softmax", *[n for n in registered if n in names and n != "softmax"]]:
        options_known = mixer_options(name)
        options: dict[str, Any] = {}
        if isinstance(options_known.get("window"), int):
            options["window"] = window
        cls = mixer_class(name)
        if name == "softmax":
            plans = [("reference", "reference", "plain"), ("sdpa", "sdpa-flash" if pin_flash else "sdpa", "sdpa")]
        elif "backend" in options_known:
            backend = mixer_backend(name, device, "window" in options)
            plans = [(backend, backend, "")]
        else:
            plans = [(None, "default", "")]
        for backend, label, role in plans:
            opts = options if backend is None else {**options, "backend": backend}
            make, make_step = _mixer_makers(name, opts, pin_flash and role == "sdpa", seed)
            # The softmax mixer's step reads its KV cache through SDPA whatever its backend: one case.
            steps = Pattern.CAUSAL_SELF in cls.patterns and role != "plain"
            out.cases.append(Case("mixer", name, "", label, cls.patterns, make, make_step if steps else None, role))
    return out


def _mixer_makers(name: str, options: dict[str, Any], pin_flash: bool, seed: int):
    built: dict[tuple, torch.nn.Module] = {}

    def mixer_for(s: Shape) -> torch.nn.Module:
        key = (s.device, s.dtype, s.heads, s.head_dim)
        if key not in built:
            built.clear()
            torch.manual_seed(seed)
            built[key] = build_mixer(name, s.d_model, s.heads, **options).to(device=s.device, dtype=s.dtype)
        return built[key]

    def make(s: Shape) -> Run:
        mixer = mixer_for(s)
        params = list(mixer.parameters())
        for p in params:
            p.requires_grad_(s.grad)
        x = _randn(s, s.batch, s.length, s.d_model)
        context = _randn(s, s.batch, s.length, s.d_model) if s.pattern.cross else None

        def call():
            with sdpa_context(pin_flash):
                return mixer(x, context, causal=s.pattern.causal)

        return _run(call, [x, context, *params])

    def make_step(s: Shape) -> Run:
        mixer = mixer_for(s)
        params = list(mixer.parameters())
        for p in params:
            p.requires_grad_(False)
        state = grown_state(mixer, s.batch, s.length)
        x_t = _randn(s, s.batch, s.d_model)
        tensors = _state_tensors(state)

        def call():
            with sdpa_context(pin_flash):
                return mixer.step(x_t, state)[0]

        return _run(call, [x_t, *params, *tensors], _nbytes(tensors))

    return make, make_step


# -- peers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerSpec:
    name: str  # e.g. "fla.chunk_gla"
    module: str
    function: str
    counterpart: str  # the label of the seqmix op case it is compared with
    patterns: frozenset[Pattern]
    build: Callable[[Callable], Callable[[Shape], Run]]


def _fla_gla(gate: str):
    def build(fn):
        def make(s: Shape) -> Run:
            q, k, v = _qkv(s)
            if gate == "none":
                return _run(lambda: fn(q=q, k=k, v=v, normalize=False), [q, k, v])
            g = _log_gate(s, s.length, gate == "channel")
            return _run(lambda: fn(q=q, k=k, v=v, g=g), [q, k, v, g])

        return make

    return build


def _fla_delta(fn):
    def make(s: Shape) -> Run:
        q, k, v, beta, g = _delta_inputs(s, s.length, True)
        return _run(lambda: fn(q=q, k=k, v=v, g=g, beta=beta), [q, k, v, beta, g])

    return make


def _flex_window(fn):
    """FlexAttention with a sliding-window block mask made once, outside the timed call (compiled on CUDA)."""
    compiled: dict[str, Callable] = {}

    def make(s: Shape) -> Run:
        from torch.nn.attention.flex_attention import create_block_mask

        w, causal = s.window, s.pattern.causal

        def local(b, h, i, j):
            return ((j <= i) & (i - j < w)) if causal else ((i - j < w) & (j - i < w))

        block_mask = create_block_mask(local, B=None, H=None, Q_LEN=s.length, KV_LEN=s.length, device=s.device)
        if s.device.type == "cuda" and "fn" not in compiled:
            compiled["fn"] = torch.compile(fn, dynamic=False)
        flex = compiled.get("fn", fn)
        q, k, v = _qkv(s)
        return _run(lambda: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask), [q, k, v])

    return make


PEERS = (
    PeerSpec("fla.chunk_simple_gla", "fla.ops.simple_gla", "chunk_simple_gla", "gated_linear_attention/head_gate", CAUSAL, _fla_gla("head")),
    PeerSpec("fla.chunk_gla", "fla.ops.gla", "chunk_gla", "gated_linear_attention/channel_gate", CAUSAL, _fla_gla("channel")),
    PeerSpec("fla.chunk_gated_delta_rule", "fla.ops.gated_delta_rule", "chunk_gated_delta_rule", "delta_rule/gate", CAUSAL, _fla_delta),
    PeerSpec("fla.chunk_linear_attn", "fla.ops.linear_attn", "chunk_linear_attn", "gated_linear_attention/no_gate", CAUSAL, _fla_gla("none")),
    PeerSpec(
        "torch.flex_attention", "torch.nn.attention.flex_attention", "flex_attention", "softmax_attention/window", CAUSAL_AND_SELF_ALIGNED, _flex_window
    ),
)
PEER_NAMES = tuple(p.name for p in PEERS)


def peer_cases(names: list[str], device: torch.device) -> CaseSet:
    """The peers in ``names``: those not installed (or not runnable on ``device``) are listed as such."""
    unknown = sorted(set(names) - set(PEER_NAMES))
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; the profiler knows {list(PEER_NAMES)}")
    out = CaseSet()
    for spec in PEERS:
        if spec.name not in names:
            continue
        try:
            fn = getattr(importlib.import_module(spec.module), spec.function)
        except (ImportError, AttributeError) as e:
            out.unavailable.append(Unavailable("peer", spec.name, f"not installed ({type(e).__name__}: {e})"))
            continue
        if spec.name.startswith("fla.") and device.type != "cuda":
            out.unavailable.append(Unavailable("peer", spec.name, "installed, not run: its Triton kernels need CUDA"))
            continue
        backend = "compiled" if spec.name == "torch.flex_attention" and device.type == "cuda" else ("eager" if spec.name == "torch.flex_attention" else "triton")
        out.cases.append(Case("peer", spec.name, "", backend, spec.patterns, spec.build(fn), None, "", spec.counterpart))
    return out
