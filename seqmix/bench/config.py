"""Typed benchmark configs: one run (``RunConfig``) and a suite of runs (``SuiteConfig``).

A suite is a TOML file (the shipped ones live in ``seqmix/bench/suites/``)::

    name = "quick"
    description = "..."
    mixers = ["softmax", "gla", ["gla", "softmax"]]  # a list is one mixer per layer (a hybrid)

    [defaults]                 # RunConfig fields for every run
    d_model = 64

    [grid]                     # RunConfig fields swept: the runs are the product of these lists
    lr = [1e-3, 3e-3]

    [[tasks]]                  # one entry per task variant
    task = "mqar"
    options = { seq_len = 64, num_kv_pairs = 4 }  # the task's own options
    settings = { max_steps = 200 }                # RunConfig fields for this task's runs

The runs are tasks x mixers x grid, less the (task, mixer) pairs where the mixer cannot serve the
patterns the task's model needs. A field's value comes from, last wins: ``RunConfig``'s default,
``[defaults]``, the task's ``settings``, the grid, the command line (``key=value``, or
``task.option=value`` for a task option). Everything is checked before anything runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seqmix import tasks as task_lib
from seqmix.mixers import list_mixers, mixer_class
from seqmix.patterns import Pattern

SUITES_DIR = Path(__file__).parent / "suites"

Mixers = str | tuple[str, ...]

# The patterns each model kind runs its mixers in (see ``seqmix.models``).
MODEL_PATTERNS: dict[str, frozenset[Pattern]] = {
    "encoder_classifier": frozenset({Pattern.NONCAUSAL_SELF}),
    "decoder_lm": frozenset({Pattern.CAUSAL_SELF}),
    "encoder_decoder": frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_CROSS}),
    "aligned_transducer": frozenset({Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS}),
}


@dataclass(frozen=True)
class RunConfig:
    """One training run: a task, a model around some mixer(s), an optimiser budget, a seed, a device.

    Training goes ``epochs`` times over ``train_size`` generated examples in batches of
    ``batch_size`` (the last partial batch is dropped), stopping after ``max_steps`` optimiser steps
    if set, or earlier once the held-out metric reaches ``target`` (checked every ``eval_every``
    steps). The learning rate warms up linearly over the first ``warmup`` fraction of the steps
    to ``lr`` and then decays to zero along a cosine. ``threads``: torch's CPU threads for the run
    (``None``: torch's default); part of the config because throughput depends on it.
    ``sequence_parallel``: ranks each sequence is split over (``P > 1``: launched by ``torchrun``
    with ``P`` processes; see :mod:`seqmix.bench.parallel`).
    """

    task: str
    mixer: Mixers
    task_options: Mapping[str, Any] = field(default_factory=dict)
    mixer_options: Mapping[str, Any] = field(default_factory=dict)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 32
    train_size: int = 4096
    epochs: int = 1
    max_steps: int | None = None
    eval_size: int = 512
    eval_every: int = 0
    target: float | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        for name in FIELD_TYPES:
            object.__setattr__(self, name, coerce(name, getattr(self, name), FIELD_TYPES[name]))
        for name in ("d_model", "n_layers", "n_heads", "batch_size", "train_size", "epochs", "eval_size", "sequence_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: evaluate at the end only), got {self.eval_every}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip <= 0 or not 0 <= self.warmup < 1:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, grad_clip > 0 and 0 <= warmup < 1; got lr={self.lr}, "
                f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip}, warmup={self.warmup}"
            )
        if self.train_size < self.batch_size:
            raise ValueError(f"train_size ({self.train_size}) must be at least batch_size ({self.batch_size})")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if isinstance(self.mixer, tuple) and len(self.mixer) != self.n_layers:
            raise ValueError(f"mixer {self.mixer_label!r} names {len(self.mixer)} layers but n_layers={self.n_layers}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    @property
    def mixer_label(self) -> str:
        return mixer_label(self.mixer)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): the run's identity is a hash of it. ``sequence_parallel``
        is left out at 1 (its default), so runs stored before the field existed keep their ids."""
        fields = dataclasses.asdict(self)
        if self.sequence_parallel == 1:
            del fields["sequence_parallel"]
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))


FIELD_TYPES: dict[str, Any] = typing.get_type_hints(RunConfig)
SUITE_FIELDS = frozenset(FIELD_TYPES) - {"task", "mixer", "task_options"}  # settable in [defaults]/[grid]/settings/CLI


def mixer_label(mixer: Mixers) -> str:
    """``"gla"``, or ``"gla+gla+softmax"`` for one mixer per layer."""
    return mixer if isinstance(mixer, str) else "+".join(mixer)


def parse_mixers(text: str) -> tuple[Mixers, ...]:
    """``"softmax,gla+gla+softmax"`` -> ``("softmax", ("gla", "gla", "softmax"))``."""
    out: list[Mixers] = []
    for item in text.split(","):
        parts = tuple(p.strip() for p in item.split("+"))
        if not all(parts):
            raise ValueError(f"--mixers: empty mixer name in {text!r}; expected names separated by ',' (and '+' within a hybrid)")
        out.append(parts[0] if len(parts) == 1 else parts)
    return tuple(out)


# -- type checks -----------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "").replace("collections.abc.", "")


def coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` and normalised (int -> float for float
    fields, list -> tuple, mapping -> dict); a ``TypeError`` naming ``name`` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return coerce(name, value, option)
            except TypeError:
                pass
    elif tp is type(None):
        if value is None:
            return None
    elif tp is Any:
        return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if isinstance(value, list | tuple) and value:
            return tuple(coerce(name, v, args[0]) for v in value)
    elif origin in (Mapping, dict):
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return {k: coerce(f"{name}.{k}", v, args[1]) for k, v in value.items()}
    else:
        raise TypeError(f"{name}: unsupported annotation {tp!r}")
    raise TypeError(f"{name} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _option_type(default: Any) -> Any:
    """The type a task option takes, read from its default (``None``: anything)."""
    if default is None:
        return Any
    if isinstance(default, bool | int | str):
        return type(default)
    if isinstance(default, float):
        return float
    if isinstance(default, tuple | list):
        return tuple[Any, ...]
    return Any


def parse_value(text: str) -> Any:
    """A command-line value as TOML (``3e-3``, ``true``, ``[64, 128]``, ``"x"``); ``none`` is
    ``None``; anything else that is not TOML is a bare string (``device=cuda``)."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


@dataclass(frozen=True)
class Sweep:
    """An override that sweeps a run field over ``values`` (``lr=[1e-3,3e-3]``): it replaces the
    suite's grid axis for that field, or adds one."""

    values: tuple[Any, ...]


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=3e-3", "mqar.seq_len=128", "d_model=[64,128]"]`` -> ``{"lr": 0.003, "mqar.seq_len":
    128, "d_model": Sweep((64, 128))}``, each value checked against the ``RunConfig`` field or the
    task option it names. A list sets a sweep of a run field."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value")
        value = parse_value(text)
        if "." in key:
            task, option = key.split(".", 1)
            known = _task_option_defaults(task, f"override {item!r}")
            if option not in known:
                raise ValueError(f"override {item!r}: task {task!r} has no option {option!r}; its options: {sorted(known)}")
            out[key] = coerce(key, value, _option_type(known[option]))
        elif key in SUITE_FIELDS and isinstance(value, list) and typing.get_origin(FIELD_TYPES[key]) is not Mapping:
            if not value:
                raise ValueError(f"override {item!r}: a sweep needs at least one value")
            out[key] = Sweep(tuple(coerce(key, v, FIELD_TYPES[key]) for v in value))
        elif key in SUITE_FIELDS:
            out[key] = coerce(key, value, FIELD_TYPES[key])
        else:
            raise ValueError(
                f"override {item!r}: unknown key {key!r}; run fields: {sorted(SUITE_FIELDS)}, or <task>.<option> for a task option"
            )
    return out


# -- suites ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskEntry:
    """One task variant of a suite: the task, its options, and run fields for its runs."""

    task: str
    options: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteConfig:
    """A suite: tasks x mixers x grid (see the module docstring)."""

    name: str
    description: str
    mixers: tuple[Mixers, ...]
    tasks: tuple[TaskEntry, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannedRun:
    """A run of a plan, with what the plan knows of it before it runs."""

    config: RunConfig
    pattern: Pattern
    model: str


@dataclass(frozen=True)
class Plan:
    """The runs a suite expands into, and the (task, mixer) pairs left out with the reason."""

    suite: str
    runs: tuple[PlannedRun, ...]
    skipped: tuple[str, ...]


def list_suites() -> list[str]:
    """Names of the shipped suites."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


def _task_option_defaults(task: str, where: str) -> dict[str, Any]:
    if task not in task_lib.list_tasks():
        raise ValueError(f"{where}: unknown task {task!r}; tasks: {', '.join(task_lib.list_tasks())}")
    return dict(task_lib.task_options(task))


def _check_keys(where: str, table: Any, allowed: Sequence[str], required: Sequence[str] = ()) -> None:
    if not isinstance(table, Mapping):
        raise TypeError(f"{where} must be a table, got {table!r}")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(set(required) - set(table))
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")


def _check_mixers(where: str, mixers: Mixers) -> None:
    for name in (mixers,) if isinstance(mixers, str) else mixers:
        if name not in list_mixers():
            raise ValueError(f"{where}: unknown mixer {name!r}; registered mixers: {', '.join(list_mixers())}")


def _check_run_fields(where: str, table: Any) -> dict[str, Any]:
    _check_keys(where, table, sorted(SUITE_FIELDS))
    return {k: coerce(f"{where}.{k}", v, FIELD_TYPES[k]) for k, v in table.items()}


def suite_from_dict(data: Mapping[str, Any], source: str) -> SuiteConfig:
    """A validated ``SuiteConfig`` from a parsed TOML table; ``source`` names it in errors."""
    _check_keys(source, data, ["name", "description", "mixers", "tasks", "defaults", "grid"], ["name", "mixers", "tasks"])
    mixers = coerce(f"{source}: mixers", data["mixers"], tuple[Mixers, ...])
    for m in mixers:
        _check_mixers(f"{source}: mixers", m)
    defaults = _check_run_fields(f"{source}: [defaults]", data.get("defaults", {}))
    grid_table = data.get("grid", {})
    _check_keys(f"{source}: [grid]", grid_table, sorted(SUITE_FIELDS))
    grid = {}
    for key, values in grid_table.items():
        if not isinstance(values, list) or not values:
            raise TypeError(f"{source}: [grid].{key} must be a non-empty list, got {values!r}")
        grid[key] = tuple(coerce(f"{source}: [grid].{key}", v, FIELD_TYPES[key]) for v in values)
    if not isinstance(data["tasks"], list) or not data["tasks"]:
        raise TypeError(f"{source}: tasks must be a non-empty array of tables ([[tasks]])")
    entries = []
    for i, entry in enumerate(data["tasks"]):
        where = f"{source}: tasks[{i}]"
        _check_keys(where, entry, ["task", "options", "settings"], ["task"])
        known = _task_option_defaults(entry["task"], where)
        options = entry.get("options", {})
        _check_keys(f"{where}.options (task {entry['task']!r})", options, sorted(known))
        options = {k: coerce(f"{where}.options.{k}", v, _option_type(known[k])) for k, v in options.items()}
        settings = _check_run_fields(f"{where}.settings", entry.get("settings", {}))
        entries.append(TaskEntry(entry["task"], options, settings))
    return SuiteConfig(
        name=coerce(f"{source}: name", data["name"], str),
        description=coerce(f"{source}: description", data.get("description", ""), str),
        mixers=mixers,
        tasks=tuple(entries),
        defaults=defaults,
        grid=grid,
    )


def load_suite(name_or_path: str | Path) -> SuiteConfig:
    """A shipped suite by name (``quick``, ``mqar``, ``lra``, ``full``) or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        if str(name_or_path) not in list_suites():
            raise ValueError(f"unknown suite {str(name_or_path)!r}; suites: {', '.join(list_suites())} (or a path to a .toml file)")
        path = SUITES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ValueError(f"suite file {str(path)!r} does not exist")
    with path.open("rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"suite file {str(path)!r} is not valid TOML: {e}") from None
    return suite_from_dict(data, path.name)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; a CUDA device that is not
    there fails here, before anything runs."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device (torch {torch.__version__})")
    return device


def expand(suite: SuiteConfig, *, mixers: Sequence[Mixers] | None = None, overrides: Mapping[str, Any] | None = None) -> Plan:
    """The runs of ``suite``: tasks x mixers x grid, with ``mixers`` (if given) in place of the
    suite's, and ``overrides`` (from ``parse_overrides``) applied last (a ``Sweep`` as a grid axis).
    Identical runs appear once."""
    overrides = dict(overrides or {})
    mixer_list = tuple(mixers) if mixers is not None else suite.mixers
    if not mixer_list:
        raise ValueError("no mixers to run")
    for m in mixer_list:
        _check_mixers("--mixers", m)
    task_names = {e.task for e in suite.tasks}
    for key in overrides:
        if "." in key and key.split(".", 1)[0] not in task_names:
            raise ValueError(f"override {key!r} names a task suite {suite.name!r} does not run; its tasks: {sorted(task_names)}")
    run_overrides = {k: v for k, v in overrides.items() if "." not in k and not isinstance(v, Sweep)}
    grid = dict(suite.grid) | {k: v.values for k, v in overrides.items() if isinstance(v, Sweep)}
    grid_keys = list(grid)
    runs: dict[str, PlannedRun] = {}
    skipped: list[str] = []
    for entry in suite.tasks:
        options = dict(task_lib.task_options(entry.task)) | dict(entry.options)
        options |= {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith(entry.task + ".")}
        task = task_lib.build_task(entry.task, **options)
        needed = MODEL_PATTERNS[task.model]
        for mixer in mixer_list:
            names = (mixer,) if isinstance(mixer, str) else mixer
            missing = sorted({p.short for name in names for p in needed - mixer_class(name).patterns})
            if missing:
                skipped.append(f"{entry.task}/{mixer_label(mixer)}: the {task.model} model needs pattern(s) {', '.join(missing)}")
                continue
            for point in itertools.product(*(grid[k] for k in grid_keys)):
                fields = dict(suite.defaults) | dict(entry.settings) | dict(zip(grid_keys, point)) | run_overrides
                fields["device"] = resolve_device(fields.get("device", "auto"))
                if fields.get("sequence_parallel", 1) > 1 and task.model != "decoder_lm":
                    skipped.append(f"{entry.task}/{mixer_label(mixer)}: sequence parallelism serves decoder_lm models, the task needs {task.model}")
                    break
                config = RunConfig(task=entry.task, mixer=mixer, task_options=options, **fields)
                runs.setdefault(config.to_json(), PlannedRun(config, task.pattern, task.model))
    if not runs:
        raise ValueError(f"suite {suite.name!r} plans no runs: " + "; ".join(skipped))
    return Plan(suite.name, tuple(runs.values()), tuple(skipped))
