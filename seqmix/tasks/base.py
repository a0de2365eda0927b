"""The task protocol, its registry, and the losses and metrics tasks share.

A task is a small frozen dataclass whose fields are its options. It says which pattern it probes
and which model kind it needs, and makes deterministic splits:
``make_split(split, n, seed) -> batch``, a dict of tensors with

- ``input_ids [n, T]`` long; ``labels`` ``[n, T]`` long (``IGNORE = -100`` where there is nothing
  to predict) or ``[n]`` for classification;
- optional ``context_ids [n, S]`` long, ``mask [n, T]`` and ``context_mask [n, S]`` bool (True at
  real tokens).

``loss(logits, batch)`` is the mean cross-entropy over labelled positions; ``metrics(logits,
batch)`` returns per metric a ``(sum, count)`` pair, so that metrics over many batches aggregate as
``sum(sums) / sum(counts)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from seqmix.patterns import Pattern

IGNORE = -100
SPLITS = ("train", "test")

Batch = dict[str, torch.Tensor]
Metrics = dict[str, tuple[float, int]]


class Task:
    """Base of all tasks; subclasses are frozen dataclasses (options as fields) and set the class
    attributes below and ``vocab_size`` and ``seq_len`` (a field or a property)."""

    name: ClassVar[str] = ""
    pattern: ClassVar[Pattern]
    model: ClassVar[str]  # one of seqmix.models.MODEL_KINDS
    metric: ClassVar[str] = "accuracy"  # the headline metric
    higher_is_better: ClassVar[bool] = True  # of the headline metric
    num_classes: ClassVar[int | None] = None
    # Loss and metrics are the base ones, sums over labelled tokens taken one at a time: the runner
    # may then compute logits at the labelled positions only (``decoder_lm``'s ``logits_at``).
    scores_labelled_tokens: ClassVar[bool] = False
    vocab_size: int
    seq_len: int

    def make_split(self, split: str, n: int, seed: int) -> Batch:
        """``n`` examples of ``split`` ("train" or "test"), a function of ``(task options, split, seed)`` only."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        return self._make(split, n, seed)

    def _make(self, split: str, n: int, seed: int) -> Batch:
        raise NotImplementedError

    def generator(self, split: str, seed: int) -> torch.Generator:
        """A CPU generator seeded from ``(task name, split, seed)``: train and test never share a stream."""
        digest = hashlib.sha256(f"{self.name}/{split}/{seed}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over labelled positions (``labels != IGNORE``)."""
        logits, labels = _flat(logits, batch["labels"])
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)

    def metrics(self, logits: torch.Tensor, batch: Batch) -> Metrics:
        """``{"loss": (sum of cross-entropy, labelled count), "accuracy": (correct, labelled count)}``."""
        return token_metrics(logits, batch["labels"])


# -- metrics shared by tasks -----------------------------------------------------------------
def _flat(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [..., C]`` and ``labels [...]`` -> ``[N, C]`` and ``[N]``, after checking the shapes agree."""
    if not isinstance(logits, torch.Tensor) or logits.shape[:-1] != labels.shape:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape {list(labels.shape)} + [classes], got {got}")
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def token_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Metrics:
    """Loss and accuracy over labelled positions, as ``(sum, count)`` pairs."""
    flat_logits, flat_labels = _flat(logits.detach(), labels)
    keep = flat_labels != IGNORE
    count = int(keep.sum())
    ce = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE, reduction="sum")
    correct = (flat_logits.argmax(-1) == flat_labels) & keep
    return {"loss": (float(ce), count), "accuracy": (float(correct.sum()), count)}


def exact_match(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Sequences (rows of ``labels [B, T]`` with a label) whose every labelled position is right."""
    _flat(logits, labels)
    logits = logits.detach()
    keep = labels != IGNORE
    wrong = (logits.argmax(-1) != labels) & keep
    has_labels = keep.any(dim=1)
    return float((has_labels & ~wrong.any(dim=1)).sum()), int(has_labels.sum())


def bits_per_token(loss_metric: tuple[float, int]) -> tuple[float, int]:
    """A cross-entropy ``(sum in nats, count)`` in bits."""
    total, count = loss_metric
    return total / math.log(2), count


# -- the registry ----------------------------------------------------------------------------
_TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: registers a task (a frozen dataclass) under its ``name``."""
    if not cls.name or cls.name in _TASKS:
        raise ValueError(f"task name {cls.name!r} is empty or already registered")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"task {cls.name!r} must be a dataclass")
    _TASKS[cls.name] = cls
    return cls


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_TASKS)


def task_class(name: str) -> type[Task]:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(list_tasks())}")
    return _TASKS[name]


def task_options(name: str) -> dict[str, object]:
    """The options of task ``name`` with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(task_class(name))}


def build_task(name: str, **options) -> Task:
    """Builds task ``name``; unknown names or options fail at once, listing what exists."""
    known = task_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"task {name!r} takes no option(s) {unknown}; its options: {sorted(known)}")
    return task_class(name)(**options)


# -- option checks ---------------------------------------------------------------------------
def check_int(task: str, name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{task}: {name} must be an int >= {minimum}, got {value!r}")


def check_choice(task: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{task}: {name} must be one of {choices}, got {value!r}")
