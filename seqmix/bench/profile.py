"""``seqmix profile``: time and peak memory against sequence length, for ops, mixers and peers.

A sweep measures every case (``profile_cases``) in every asked mode and pattern it serves, at each
length, with ``tokens // T`` sequences per step (or a fixed ``--batch``); in ``step`` mode, one
decoding step against a context of each length, at each ``--step-batches`` size (on CUDA timed as a
CUDA-graph replay, as a decoding loop would run it, host launch overhead out; the eager time is
kept in the point's note). Each point is warmed up, then timed (median of repeats) and measured for
peak memory (``measure``). Out of memory is recorded as ``OOM`` and the sweep goes on; a point
predicted (from the case's measured growth) or found (a warm call) to exceed ``--time-cap-s`` is
recorded as skipped, and so is every point once ``--budget-s`` has passed. Rows go to the
``profile`` table of ``--db`` as they come; the Markdown report and the plots (``profile_report``)
go to ``--out``. Sweeps made apart (one device call each) merge into one results file and one
report with ``--merge`` and ``--report-only``.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import platform
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import click
import torch

from seqmix.bench import measure
from seqmix.bench.profile_cases import OP_NAMES, PEER_NAMES, Case, CaseSet, Shape, Unavailable, mixer_cases, op_cases, peer_cases
from seqmix.bench.profile_report import write_report
from seqmix.bench.store import git_revision
from seqmix.bench.profile_store import connect_profile, insert_row, insert_run, load_rows, load_runs, merge_into
from seqmix.mixers import list_mixers
from seqmix.patterns import Pattern

MODES = ("fwd", "fwdbwd", "step")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLA_GUARD = "fla-guard-lifted"


@dataclass(frozen=True)
class Sweep:
    """What one ``seqmix profile`` measures and how."""

    lengths: tuple[int, ...]
    tokens: int | None
    batch: int | None
    heads: int
    head_dim: int
    dtype: str
    modes: tuple[str, ...]
    patterns: tuple[Pattern, ...]
    device: torch.device
    window: int
    step_batches: tuple[int, ...]
    warmup_ms: float
    rep_ms: float
    time_cap_s: float
    budget_s: float | None

    def batch_at(self, length: int) -> int:
        return self.batch if self.batch is not None else max(1, (self.tokens or length) // length)


def versions() -> dict[str, str]:
    """Python, torch, triton and flash-linear-attention versions (``absent`` where not installed)."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for key, dists in (("triton", ("triton",)), ("fla", ("flash-linear-attention", "fla-core"))):
        found[key] = "absent"
        for dist in dists:
            try:
                found[key] = f"{dist} {metadata.version(dist)}" if key == "fla" else metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def lift_fla_hopper_guard() -> str:
    """Sets ``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True``: flash-linear-attention 0.6.0
    refuses its gated backward on Hopper with Triton < 3.7.1 (its issue #640); lifted for timing
    only. Returns a note for the report."""
    try:
        import fla.ops.common.chunk_o as chunk_o
    except ImportError as e:
        return f"--lift-fla-guard: nothing lifted, flash-linear-attention is not installed ({e})"
    if not hasattr(chunk_o, "TRITON_ABOVE_3_7_1"):
        return "--lift-fla-guard: nothing lifted, fla.ops.common.chunk_o has no TRITON_ABOVE_3_7_1 in this version"
    was = chunk_o.TRITON_ABOVE_3_7_1
    chunk_o.TRITON_ABOVE_3_7_1 = True
    return (
        f"flash-linear-attention's guard lifted: fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True (was {was}). fla 0.6.0 "
        "refuses its gated backward on Hopper with Triton < 3.7.1 (fla issue #640); its fwd+bwd timings here are "
        "for timing only, its gradients at this Triton are not vouched for by this run."
    )


def _call(run, mode: str):
    """The measured call: the forward under ``no_grad`` (fwd, step), or forward and backward from a
    fixed random output gradient (fwdbwd; made at the first call and kept with the inputs)."""
    if mode != "fwdbwd":

        def forward():
            with torch.no_grad():
                return run.forward()

        return forward

    grad: list[torch.Tensor] = []

    def forward_backward():
        out = run.forward()
        if not grad:
            grad.append(torch.randn_like(out))
            run.inputs.append(grad[0])
        out.backward(grad[0])

    return forward_backward


@dataclass
class Point:
    time_ms: float | None = None
    first_ms: float | None = None
    timer: str | None = None
    repeats: int | None = None
    memory: measure.Memory | None = None
    input_bytes: int | None = None
    state_bytes: int | None = None
    status: str = "ok"
    note: str = ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def measure_point(case: Case, shape: Shape, mode: str, sweep: Sweep) -> Point:
    """Builds the case's run at ``shape``, warms it up, times it, measures its peak memory."""
    point = Point()
    run = None
    try:
        run = (case.make_step if mode == "step" else case.make)(shape)
        call = eager = _call(run, mode)
        if mode == "step" and shape.device.type == "cuda":
            call, point.note = _graphed(eager, run.leaves, shape.device, sweep)
        first_s = measure.first_call(call, run.leaves, shape.device)
        point.first_ms = first_s * 1e3
        if first_s > sweep.time_cap_s:  # the first call may have compiled: ask a second
            first_s = measure.first_call(call, run.leaves, shape.device)
        if first_s > sweep.time_cap_s:
            point.status = f"skipped: over time cap (a warm call took {first_s:.1f} s > {sweep.time_cap_s:g} s)"
            return point
        timing = measure.time_call(call, run.leaves, shape.device, first_ms=first_s * 1e3, warmup_ms=sweep.warmup_ms, rep_ms=sweep.rep_ms)
        point.time_ms, point.timer, point.repeats = timing.ms, timing.timer, timing.repeats
        if call is not eager:
            point.timer += "+cuda.graph"
        point.input_bytes, point.state_bytes = measure.tensor_bytes(run.inputs), run.state_bytes
        try:
            point.memory = measure.peak_memory(eager, run.leaves, run.inputs, shape.device)  # a replay allocates nothing
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001  (the time stands; say why memory is missing)
            point.note = f"memory not measured: {_first_line(e)}"
    except (torch.OutOfMemoryError, MemoryError):
        point = Point(first_ms=point.first_ms, status="OOM")
    except Exception as e:  # noqa: BLE001  (recorded in the row; the sweep goes on)
        point = Point(first_ms=point.first_ms, status=f"error: {_first_line(e)}")
    finally:
        del run
    if point.status != "ok" and not point.status.startswith("skipped"):
        gc.collect()  # a failure's traceback may hold the inputs in reference cycles
    if shape.device.type == "cuda":
        torch.cuda.empty_cache()
    return point


def _graphed(eager, leaves: list[torch.Tensor], device: torch.device, sweep: Sweep):
    """``(the step captured in a CUDA graph, a note with its eager time)``; the eager call itself
    and why, where capture fails."""
    first_s = measure.first_call(eager, leaves, device)
    eager_ms = measure.time_call(eager, leaves, device, first_ms=first_s * 1e3, warmup_ms=sweep.warmup_ms, rep_ms=sweep.rep_ms).ms
    try:
        return measure.cuda_graph(eager), f"eager (no CUDA graph) {eager_ms * 1e3:.1f} us"
    except Exception as e:  # noqa: BLE001  (timed eagerly instead; the note says why)
        torch.cuda.synchronize(device)
        return eager, f"eager: CUDA graph capture failed: {_first_line(e)}"


def predicted_ms(history: list[tuple[int, int, float]], length: int, batch: int, slopes: tuple[float, float] = (1.0, 2.0)) -> float | None:
    """One call's time at ``(length, batch)`` from the case's measured ``(length, batch, ms)``,
    as ``time ~ batch * length^s``: ``s`` from the last two points, clamped to ``slopes`` (its
    upper end with one point). A whole sequence costs between linear and quadratic time in
    ``length`` (with a fixed number of tokens per step, at most linear growth); one decoding step
    between constant (a recurrent state) and linear (a KV cache): ``slopes = (0, 1)``."""
    if not history:
        return None
    n1, b1, t1 = history[-1]
    low, high = slopes
    slope = high
    if len(history) > 1:
        n0, b0, t0 = history[-2]
        if t0 > 0 and t1 > 0:
            slope = min(high, max(low, math.log((t1 / b1) / (t0 / b0)) / math.log(n1 / n0)))
    return t1 * (batch / b1) * (length / n1) ** slope


def run_sweep(cases: list[Case], sweep: Sweep, *, conn, run_id: str, meta: dict, echo=click.echo) -> None:
    """Measures every case at every point of the sweep, writing each row as it comes."""
    start = time.monotonic()
    for mode in sweep.modes:
        for pattern in sweep.patterns if mode != "step" else (Pattern.CAUSAL_SELF,):
            for case in cases:
                if pattern not in case.patterns or (mode == "step" and case.make_step is None):
                    continue
                for batch in sweep.step_batches if mode == "step" else (None,):
                    history: list[tuple[int, int, float]] = []
                    for length in sweep.lengths:
                        b = batch if batch is not None else sweep.batch_at(length)
                        shape = Shape(pattern, b, length, sweep.heads, sweep.head_dim, DTYPES[sweep.dtype], sweep.device, mode == "fwdbwd", sweep.window)
                        guess = predicted_ms(history, length, b, (0.0, 1.0) if mode == "step" else (1.0, 2.0))
                        if sweep.budget_s is not None and time.monotonic() - start > sweep.budget_s:
                            point = Point(status=f"skipped: over run budget ({sweep.budget_s:g} s)")
                        elif guess is not None and guess / 1e3 > sweep.time_cap_s:
                            point = Point(status=f"skipped: over time cap (predicted {guess / 1e3:.1f} s > {sweep.time_cap_s:g} s)")
                        else:
                            point = measure_point(case, shape, mode, sweep)
                        if point.time_ms is not None:
                            history.append((length, b, point.time_ms))
                        _write(conn, run_id, meta, case, shape, mode, point)
                        echo(_line(case, shape, mode, point))


def _write(conn, run_id: str, meta: dict, case: Case, shape: Shape, mode: str, point: Point) -> None:
    mem = point.memory
    insert_row(
        conn,
        {
            "run_id": run_id, "level": case.level, "name": case.name, "variant": case.variant, "pattern": shape.pattern.short,
            "backend": case.backend_in(mode), "role": case.role, "counterpart": case.counterpart, "mode": mode, "dtype": meta["dtype"],
            "batch": shape.batch, "length": shape.length, "heads": shape.heads, "head_dim": shape.head_dim,
            "time_ms": point.time_ms, "first_ms": point.first_ms, "timer": point.timer, "repeats": point.repeats,
            "peak_bytes": mem.peak if mem else None, "extra_bytes": mem.extra if mem else None,
            "input_bytes": point.input_bytes, "state_bytes": point.state_bytes, "memory_measure": mem.measure if mem else None,
            "status": point.status, "note": point.note, "device": meta["device"], "versions": json.dumps(meta["versions"]),
            "git_revision": meta["git_revision"], "flags": ",".join(meta["flags"]),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )  # fmt: skip


def _line(case: Case, shape: Shape, mode: str, point: Point) -> str:
    head = f"{mode:6s} {shape.pattern.short} {case.level:5s} {case.label} [{case.backend_in(mode)}] B={shape.batch} T={shape.length}: "
    if point.status != "ok":
        return head + point.status
    mem = f", peak {point.memory.peak / 2**20:.1f} MiB (+{point.memory.extra / 2**20:.1f})" if point.memory else ""
    return head + f"{point.time_ms:.4g} ms{mem}"


def _names(value: str, known: list[str] | tuple[str, ...], what: str) -> list[str]:
    if value == "all":
        return list(known)
    if value == "none":
        return []
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise click.BadParameter(f"unknown {what} {unknown}; choose from {', '.join(known)} (or all, none)")
    return names


def _ints(value: str, what: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated integers, got {value!r}") from None
    if not numbers or any(n < 1 for n in numbers):
        raise click.BadParameter(f"{what} must be positive integers, got {value!r}")
    return numbers


@click.command("profile")
@click.option("--mixers", default="all", show_default=True, help="Registered mixers, comma-separated, or all / none.")
@click.option("--ops", default="all", show_default=True, help=f"Ops of seqmix.ops ({', '.join(OP_NAMES)}), or all / none.")
@click.option("--peers", default="all", show_default=True, help=f"Peers ({', '.join(PEER_NAMES)}), or all / none.")
@click.option("--patterns", default="CS", show_default=True, help="Patterns, comma-separated: NS, CS, NC, CC.")
@click.option("--lengths", default="1024,2048,4096,8192,16384,32768,65536", show_default=True, help="Sequence lengths (step: context lengths).")
@click.option("--tokens", type=int, default=None, help="Tokens per step: batch = tokens // T (default 65536).")
@click.option("--batch", type=int, default=None, help="A fixed batch size instead of --tokens.")
@click.option("--heads", default=16, show_default=True)
@click.option("--head-dim", default=128, show_default=True)
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bf16", show_default=True)
@click.option("--mode", "modes", default="fwd,fwdbwd", show_default=True, help="Comma-separated: fwd, fwdbwd, step.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--window", default=1024, show_default=True, help="Sliding window of the windowed cases (local, FlexAttention).")
@click.option("--step-batches", default="1,64", show_default=True, help="Batch sizes of step mode.")
@click.option("--warmup-ms", default=25.0, show_default=True)
@click.option("--rep-ms", default=100.0, show_default=True, help="Time spent on repeats per point (at least 3 repeats).")
@click.option("--time-cap-s", default=10.0, show_default=True, help="Skip a point whose warm call takes (or is predicted to take) longer.")
@click.option("--budget-s", type=float, default=None, help="Skip every point once the sweep has run this long.")
@click.option("--lift-fla-guard", is_flag=True, help="Set fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True (timing only; see the report).")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=None, help="SQLite results file (default OUT/profile.db).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("profile_out"), show_default=True)
@click.option("--merge", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True, help="Copy the sweeps of another results file into --db first (repeatable).")
@click.option("--report-only", is_flag=True, help="Measure nothing: write the report of the sweeps in --db.")
@click.option("--runs", default="all", show_default=True, help="With --report-only: the run ids to report, comma-separated.")
@click.option("--seed", default=0, show_default=True)
def profile(
    mixers: str, ops: str, peers: str, patterns: str, lengths: str, tokens: int | None, batch: int | None, heads: int, head_dim: int,
    dtype: str, modes: str, device: str, window: int, step_batches: str, warmup_ms: float, rep_ms: float, time_cap_s: float,
    budget_s: float | None, lift_fla_guard: bool, db: Path | None, out: Path, merge: tuple[Path, ...], report_only: bool, runs: str,
    seed: int,
) -> None:  # fmt: skip
    """Time and peak memory against sequence length, efficiency lengths, and peers side by side."""
    db = db or out / "profile.db"
    conn = connect_profile(db)
    try:
        for path in merge:
            click.echo(f"merged from {path}: {', '.join(merge_into(conn, path)) or 'nothing new'}")
        if report_only:
            run_ids = None if runs == "all" else [r.strip() for r in runs.split(",") if r.strip()]
            try:
                chosen = load_runs(conn, run_ids)
            except ValueError as e:
                raise click.BadParameter(str(e)) from None
        else:
            sweep = _sweep(lengths, tokens, batch, heads, head_dim, dtype, modes, patterns, device, window, step_batches, warmup_ms, rep_ms, time_cap_s, budget_s)
            chosen = [_measure(sweep, conn, mixers=mixers, ops=ops, peers=peers, lift_fla_guard=lift_fla_guard, seed=seed)]
        rows = load_rows(conn, [r["run_id"] for r in chosen])
    finally:
        conn.close()
    click.echo(write_report(rows, chosen, out, db=db))


def _sweep(lengths, tokens, batch, heads, head_dim, dtype, modes, patterns, device, window, step_batches, warmup_ms, rep_ms, time_cap_s, budget_s) -> Sweep:
    """The checked settings of a sweep."""
    if tokens is not None and batch is not None:
        raise click.BadParameter("give --tokens or --batch, not both")
    if (tokens is not None and tokens < 1) or (batch is not None and batch < 1):
        raise click.BadParameter("--tokens and --batch must be positive")
    mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not mode_list or set(mode_list) - set(MODES):
        raise click.BadParameter(f"--mode must be a comma-separated subset of {MODES}, got {modes!r}")
    try:
        pattern_list = tuple(Pattern.parse(p.strip()) for p in patterns.split(",") if p.strip())
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("--device cuda, but CUDA is not available")
    return Sweep(
        lengths=tuple(sorted(set(_ints(lengths, "--lengths")))), tokens=None if batch is not None else (tokens or 65536),
        batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, modes=mode_list, patterns=pattern_list, device=dev,
        window=window, step_batches=_ints(step_batches, "--step-batches"), warmup_ms=warmup_ms, rep_ms=rep_ms,
        time_cap_s=time_cap_s, budget_s=budget_s,
    )  # fmt: skip


def _measure(sweep: Sweep, conn, *, mixers: str, ops: str, peers: str, lift_fla_guard: bool, seed: int) -> dict:
    """Runs one sweep into ``conn`` and returns its record (as in ``profile_runs``)."""
    notes: list[str] = []
    flags: list[str] = []
    if lift_fla_guard:
        note = lift_fla_hopper_guard()
        notes.append(note)
        if note.startswith("flash-linear-attention's guard lifted"):
            flags.append(FLA_GUARD)
    limit = _raise_recompile_limit()
    if limit:
        notes.append(limit)

    torch.manual_seed(seed)
    dev = sweep.device
    tiny = Shape(Pattern.CAUSAL_SELF, 1, 64, sweep.heads, sweep.head_dim, DTYPES[sweep.dtype], dev, False, sweep.window)
    sets: list[CaseSet] = [
        op_cases(_names(ops, OP_NAMES, "op(s)"), tiny),
        peer_cases(_names(peers, PEER_NAMES, "peer(s)"), dev),
        mixer_cases(_names(mixers, list_mixers(), "mixer(s)"), device=dev, dtype=DTYPES[sweep.dtype], window=sweep.window, seed=seed),
    ]
    cases = [c for s in sets for c in s.cases]
    unavailable: list[Unavailable] = [u for s in sets for u in s.unavailable] + _not_served(cases, sweep)
    now = datetime.datetime.now(datetime.timezone.utc)
    run = {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6], "started_at": now.isoformat(timespec="seconds"),
        "device": device_name(dev), "versions": versions(), "git_revision": git_revision(), "flags": ",".join(flags),
        "settings": _settings(sweep, seed), "notes": notes,
        "unavailable": [[u.level, u.name, u.reason, u.mode] for u in unavailable],
    }  # fmt: skip
    insert_run(conn, run)
    click.echo(f"seqmix profile {run['run_id']}: {run['device']}, {run['versions']}, {run['git_revision']}")
    for u in unavailable:
        click.echo(f"not measured: {u.level} {u.name}" + (f" ({u.mode})" if u.mode else "") + f": {u.reason}")
    meta = {"dtype": sweep.dtype, "device": run["device"], "versions": run["versions"], "git_revision": run["git_revision"], "flags": flags}
    run_sweep(cases, sweep, conn=conn, run_id=run["run_id"], meta=meta)
    return run


def _settings(sweep: Sweep, seed: int) -> dict:
    return {
        "lengths": list(sweep.lengths), "tokens": sweep.tokens, "batch": sweep.batch, "heads": sweep.heads,
        "head_dim": sweep.head_dim, "dtype": sweep.dtype, "modes": list(sweep.modes),
        "patterns": [p.short for p in sweep.patterns], "window": sweep.window, "step_batches": list(sweep.step_batches),
        "warmup_ms": sweep.warmup_ms, "rep_ms": sweep.rep_ms, "time_cap_s": sweep.time_cap_s, "budget_s": sweep.budget_s,
        "seed": seed,
    }  # fmt: skip


def _not_served(cases: list[Case], sweep: Sweep) -> list[Unavailable]:
    """Cases that a pattern or mode of the sweep does not reach, said once each."""
    missing = []
    for case in cases:
        if case.level == "peer" and case.patterns.isdisjoint(sweep.patterns):
            served = ", ".join(p.short for p in Pattern if p in case.patterns)
            missing.append(Unavailable("peer", case.name, f"does not serve the asked patterns (serves {served})"))
        if "step" in sweep.modes and case.make_step is None and not (case.level == "mixer" and case.role == "plain"):
            why = "peers are compared in fwd and fwdbwd only" if case.level == "peer" else "no decoding form at this level"
            missing.append(Unavailable(case.level, case.label, why, mode="step"))
    return missing


def _raise_recompile_limit() -> str | None:
    """FlexAttention cases compile once per shape: more shapes than dynamo's default limit of
    recompilations (8) would fall back to the eager path, so the limit is raised for the sweep."""
    import torch._dynamo.config as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            before = getattr(dynamo, name)
            if before < 256:
                setattr(dynamo, name, 256)
                return f"torch._dynamo.config.{name} raised from {before} to 256 (FlexAttention compiles once per shape)"
            return None
    return None
