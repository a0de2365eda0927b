"""The runner: trains one model on one task and evaluates it on held-out data; runs a plan into the store.

One run (``train``): seed, build the task and the model, generate ``train_size`` training and
``eval_size`` held-out examples, then AdamW (weight decay on matrices only) with linear warm-up
and cosine decay to zero, gradient clipping by global norm, bf16 autocast on CUDA and float32 on
the CPU, an early stop once the held-out headline metric reaches ``target``, and a final held-out
evaluation. It measures:

- ``tokens_per_s``: tokens (input plus context) through training steps (forward, backward,
  optimiser) per second of training time, from the second step on (the first pays one-time
  costs; it counts only in a run of one step); data generation and evaluation are not counted.
- ``peak_memory_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` over the run above the
  level at its start (tensors only, not the allocator's cache). On the CPU, where no allocator
  keeps such a count, an estimate of what a training step holds: the model state (parameters,
  gradients and AdamW's two moments: 4 x the parameters' bytes) plus the bytes autograd saves for
  backward in the first training step (distinct storages, parameters left out). It leaves out
  transient workspace, so it is a lower bound; unlike the process's resident size it does not
  depend on what earlier runs left in the allocator.
- ``wall_s``: the whole run, data generation and evaluation included.

With ``sequence_parallel = P > 1`` (under ``torchrun``, see :mod:`seqmix.bench.parallel`) every
rank trains on its ``T/P`` tokens of each sequence; ``tokens_per_s`` counts the whole sequences
(the group's throughput), ``peak_memory_bytes`` is rank 0's, and only rank 0 writes to the store
and reports progress.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from seqmix import models as model_lib
from seqmix import tasks as task_lib
from seqmix.bench import parallel, store
from seqmix.bench.backends import mixer_backend
from seqmix.bench.config import Plan, RunConfig
from seqmix.distributed import all_reduce_gradients
from seqmix.mixers import Mixer

LOG_EVERY = 10  # steps between loss read-outs (each one synchronises the device)


@dataclass(frozen=True)
class RunResult:
    """What one run measured (see the module docstring for the measures)."""

    params: int
    metric: str
    metrics: dict[str, float]
    tokens_per_s: float
    peak_memory_bytes: int | None
    wall_s: float
    details: dict[str, Any] = field(default_factory=dict)


class SavedTensorBytes:
    """Context manager: ``.nbytes`` is the size of the distinct storages autograd saves for
    backward inside the block, storages in ``exclude`` (data pointers, e.g. parameters) left out."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.nbytes = exclude, 0
        self._seen: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self._seen[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.nbytes = sum(self._seen.values())


def build(config: RunConfig) -> tuple[Any, nn.Module]:
    """The task and the (untrained, CPU) model of a run."""
    task = task_lib.build_task(config.task, **config.task_options)
    model = model_lib.build_model(
        task.model,
        vocab_size=task.vocab_size,
        d_model=config.d_model,
        n_layers=config.n_layers,
        mixer=config.mixer if isinstance(config.mixer, str) else list(config.mixer),
        n_heads=config.n_heads,
        num_classes=task.num_classes,
        mixer_options=dict(config.mixer_options) or None,
        max_len=task.seq_len,
    )
    return task, model


def mixer_backends(model: nn.Module, device: torch.device) -> list[str]:
    """``"name:backend"`` of each distinct mixer in ``model``, ``"auto"`` with what it stands for on
    ``device`` (e.g. ``gla:auto=triton``)."""
    found = set()
    for m in model.modules():
        if isinstance(m, Mixer):
            backend = getattr(m, "backend", "n/a")
            if backend == "auto":
                backend = f"auto={mixer_backend(m.name, device, windowed=getattr(m, 'window', None) is not None)}"
            found.add(f"{m.name}:{backend}")
    return sorted(found)


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_ids"], context_ids=batch.get("context_ids"), mask=batch.get("mask"), context_mask=batch.get("context_mask"))


def _scored(task: Any, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(logits, what they are scored against)``. Tasks scored token by token
    (``task.scores_labelled_tokens``) get logits at their labelled positions only, ``[N, vocab]``
    against ``labels[labels != IGNORE]``: the same loss and metrics, with the vocabulary-wide head
    and cross-entropy on N positions instead of all (MQAR labels 1/16 to 1/8 of its tokens)."""
    if not task.scores_labelled_tokens:
        return _forward(model, batch), batch
    labelled = batch["labels"] != task_lib.IGNORE
    return model(batch["input_ids"], mask=batch.get("mask"), logits_at=labelled), {"labels": batch["labels"][labelled]}


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].numel() + (batch["context_ids"].numel() if "context_ids" in batch else 0)


def _optimizer(model: nn.Module, config: RunConfig, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW, weight decay on parameters of 2+ dims only; lr factor: ``(s+1)/w`` for the first
    ``w`` steps, then ``(1 + cos(pi (s-w) / (total-w))) / 2``."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
    warm = max(1, round(config.warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(
    task: Any, model: nn.Module, data: dict[str, torch.Tensor], batch_size: int, autocast: Callable, *, distributed: bool = False
) -> dict[str, float]:
    """Held-out metrics: each ``sum / count`` over all of ``data``, from ``task.metrics``;
    ``distributed``: ``data`` is this rank's part and the sums and counts are summed over the ranks."""
    model.eval()
    sums: dict[str, list[float]] = {}
    n = len(data["input_ids"])
    for i in range(0, n, batch_size):
        batch = {k: v[i : i + batch_size] for k, v in data.items()}
        with autocast():
            logits, scored = (_forward(model, batch), batch) if distributed else _scored(task, model, batch)
        for name, (s, c) in task.metrics(logits, scored).items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(c)
    if distributed:
        sums = parallel.all_reduce_sums(sums, data["input_ids"].device)
    return {name: s / c for name, (s, c) in sums.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(config: RunConfig, *, on_progress: Callable[[int, int, str], None] | None = None) -> RunResult:
    """Trains and evaluates one run (``config.device`` must be resolved: ``cpu``, ``cuda``...);
    ``on_progress(step, total_steps, info)`` is called as training goes."""
    if config.device == "auto":
        raise ValueError("train: config.device must be resolved (see config.resolve_device), got 'auto'")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    try:
        return _train(config, on_progress)
    finally:
        torch.set_num_threads(threads)


def _train(config: RunConfig, on_progress: Callable[[int, int, str], None] | None) -> RunResult:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    P = config.sequence_parallel
    device = torch.device(config.device if P == 1 else parallel.init_group(config.device))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        memory_base = torch.cuda.memory_allocated(device)
    torch.manual_seed(config.seed)
    task, model = build(config)
    if P > 1:
        parallel.check_task(task)
        layout = parallel.wrap_model(model, P)
    model.to(device)
    params = model_lib.count_parameters(model)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved_bytes = 0
    train_data = {k: v.to(device) for k, v in task.make_split("train", config.train_size, config.seed).items()}
    valid_data = {k: v.to(device) for k, v in task.make_split("test", config.eval_size, config.seed).items()}
    if P > 1:
        train_data, valid_data = parallel.shard_data(train_data, layout), parallel.shard_data(valid_data, layout)
    per_epoch = config.train_size // config.batch_size
    total = config.epochs * per_epoch if config.max_steps is None else min(config.max_steps, config.epochs * per_epoch)
    optimizer, schedule = _optimizer(model, config, total)
    order_gen = torch.Generator().manual_seed(config.seed)

    def reached(value: float) -> bool:
        return config.target is not None and (value >= config.target if task.higher_is_better else value <= config.target)

    step, tokens, train_s, evals, losses = 0, 0, 0.0, [], []
    stopped = False
    order = torch.empty(0, dtype=torch.long)
    _sync(device)
    segment = time.perf_counter()
    while step < total and not stopped:
        if step % per_epoch == 0:
            order = torch.randperm(config.train_size, generator=order_gen).to(device)
        idx = order[(step % per_epoch) * config.batch_size : (step % per_epoch + 1) * config.batch_size]
        batch = {k: v[idx] for k, v in train_data.items()}
        model.train()
        with autocast(), SavedTensorBytes(param_ptrs) if step == 0 else contextlib.nullcontext() as saved:
            if P == 1:
                loss = objective = task.loss(*_scored(task, model, batch))
            else:
                objective, loss = parallel.token_loss(_forward(model, batch), batch["labels"])
        if step == 0:
            saved_bytes = saved.nbytes
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if P > 1:
            all_reduce_gradients(model)  # each rank's share of the global mean's gradient, summed
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        step += 1
        if step == 1:  # the first step pays one-time costs (kernel compilation, caches): timed apart
            _sync(device)
            first = (P * _tokens(batch), time.perf_counter() - segment)
            segment = time.perf_counter()
        else:
            tokens += P * _tokens(batch)
        if step % LOG_EVERY == 0 or step == total:
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"training loss is {losses[-1]} at step {step} (lr={config.lr})")
            if on_progress:
                on_progress(step, total, f"loss {losses[-1]:.3f}")
        if config.eval_every and step % config.eval_every == 0 and step < total:
            _sync(device)
            train_s += time.perf_counter() - segment
            value = evaluate(task, model, valid_data, config.batch_size, autocast, distributed=P > 1)[task.metric]
            evals.append([step, value])
            stopped = reached(value)
            if on_progress:
                on_progress(step, total, f"{task.metric} {value:.3f}")
            segment = time.perf_counter()
    _sync(device)
    train_s += time.perf_counter() - segment
    metrics = evaluate(task, model, valid_data, config.batch_size, autocast, distributed=P > 1)
    if not evals or evals[-1][0] != step:
        evals.append([step, metrics[task.metric]])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak, measure = torch.cuda.max_memory_allocated(device) - memory_base, "cuda max_memory_allocated"
    else:
        peak = 4 * sum(p.numel() * p.element_size() for p in model.parameters()) + saved_bytes
        measure = "cpu estimate: 4 x parameter bytes + bytes saved for backward"
    details = {
        "steps": step,
        "planned_steps": total,
        "epochs": step / per_epoch,
        "stopped_early": stopped,
        "higher_is_better": task.higher_is_better,
        "seq_len": task.seq_len,
        "evals": evals,
        "train_loss": losses[-1] if losses else None,
        "train_s": train_s,
        "train_tokens": tokens,
        "backends": mixer_backends(model, device),
        "memory_measure": measure,
        "threads": torch.get_num_threads(),
        "cpu_s": time.process_time() - cpu0,
        "sequence_parallel": P,
    }
    return RunResult(
        params=params,
        metric=task.metric,
        metrics=metrics,
        tokens_per_s=tokens / train_s if tokens else first[0] / first[1],
        peak_memory_bytes=peak,
        wall_s=time.perf_counter() - wall0,
        details=details,
    )


@dataclass
class PlanSummary:
    """How a plan went: run ids done now, already done before (skipped), and failed."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def run_plan(plan: Plan, conn: sqlite3.Connection | None, *, console: Console | None = None) -> PlanSummary:
    """Runs every run of ``plan`` not yet done in the store ``conn`` (None on ranks other than 0),
    one after the other, each recorded as it starts and as it ends; a failing run records its traceback and the plan goes on.
    In a process group (sequence parallelism) rank 0 does this and tells the other ranks which runs
    to train alongside it; they write and print nothing."""
    if parallel.rank() != 0:
        return _follow_plan(plan)
    console = console or Console()
    summary = PlanSummary()
    env, revision = store.versions(), store.git_revision()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        overall = progress.add_task(f"suite {plan.suite}", total=len(plan.runs), info="")
        for planned in plan.runs:
            config = planned.config
            rid = store.run_id(config)
            if _shared_decision(store.status(conn, rid) == "done"):
                summary.skipped.append(rid)
                progress.advance(overall)
                continue
            store.start_run(conn, config, suite=plan.suite, pattern=planned.pattern.short, model=planned.model, versions=env, git_revision=revision)
            t0 = time.perf_counter()
            label = f"{config.task} {planned.pattern.short} {config.mixer_label} d{config.d_model}x{config.n_layers} lr{config.lr:g} seed{config.seed}"
            bar = progress.add_task(label, total=None, info="")
            try:
                result = train(config, on_progress=lambda step, total, info: progress.update(bar, completed=step, total=total, info=info))
            except Exception as e:  # noqa: BLE001  (any error of one run is recorded; the plan goes on)
                store.fail_run(conn, rid, traceback.format_exc(), wall_s=time.perf_counter() - t0)
                summary.failed.append(rid)
                progress.console.print(f"[red]failed[/red] {label}: {type(e).__name__}: {e}", soft_wrap=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            else:
                store.finish_run(
                    conn, rid, params=result.params, metric=result.metric, metrics=result.metrics, details=result.details,
                    tokens_per_s=result.tokens_per_s, peak_memory_bytes=result.peak_memory_bytes, wall_s=result.wall_s,
                )  # fmt: skip
                summary.done.append(rid)
                progress.console.print(
                    f"[green]done[/green] {label}: {result.metric} {result.metrics[result.metric]:.4f}, "
                    f"{result.tokens_per_s:,.0f} tok/s, {result.wall_s:.1f} s",
                    soft_wrap=True,
                )
            finally:
                progress.remove_task(bar)
            progress.advance(overall)
    return summary


def _shared_decision(decision: bool) -> bool:
    """Rank 0's ``decision``, on every rank of the process group (if any)."""
    if not dist.is_initialized():
        return decision
    shared = [decision]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _follow_plan(plan: Plan) -> PlanSummary:
    """A rank other than 0: trains the runs rank 0 trains (it decides which), silently."""
    summary = PlanSummary()
    for planned in plan.runs:
        rid = store.run_id(planned.config)
        if _shared_decision(False):
            summary.skipped.append(rid)
            continue
        try:
            train(planned.config)
        except Exception:  # noqa: BLE001  (rank 0 records the run's failure)
            summary.failed.append(rid)
        else:
            summary.done.append(rid)
    return summary
