"""The profiler's tables in a results file (SQLite, WAL mode): ``profile``, one row per measured
point, and ``profile_runs``, one row per sweep (its settings, notes and what it could not measure).

Written with the standard library, in the same file format as the benchmark's store, so both can
share one file. Every row commits at once: a sweep killed midway keeps what it measured. Sweeps
made in separate processes (e.g. separate device calls) merge into one file for one report.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from seqmix.bench.store import open_sqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS profile (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,          -- one sweep
    level TEXT NOT NULL,           -- op, mixer or peer
    name TEXT NOT NULL,            -- op, mixer or peer name
    variant TEXT NOT NULL,         -- e.g. head_gate; empty if none
    pattern TEXT NOT NULL,         -- NS, CS, NC or CC
    backend TEXT NOT NULL,         -- the backend actually used
    role TEXT NOT NULL,            -- plain or sdpa for the baselines, else empty
    counterpart TEXT NOT NULL,     -- for a peer: the seqmix op it is compared with
    mode TEXT NOT NULL,            -- fwd, fwdbwd or step
    dtype TEXT NOT NULL,
    batch INTEGER NOT NULL,
    length INTEGER NOT NULL,       -- T (step: the context length)
    heads INTEGER NOT NULL,
    head_dim INTEGER NOT NULL,
    time_ms REAL,                  -- median (step: per decoding step)
    first_ms REAL,                 -- the first call: compilation and autotuning included
    timer TEXT,                    -- triton.do_bench, cuda.events or perf_counter
    repeats INTEGER,
    peak_bytes INTEGER,            -- peak memory, inputs included
    extra_bytes INTEGER,           -- peak memory above what was allocated before the call
    input_bytes INTEGER,           -- the inputs', parameters' and state's own bytes
    state_bytes INTEGER,           -- step: the decoding state's bytes
    memory_measure TEXT,           -- cuda.max_memory_allocated or cpu.live_tensor_bytes
    status TEXT NOT NULL,          -- ok, OOM, skipped: ..., error: ...
    note TEXT NOT NULL,
    device TEXT NOT NULL,
    versions TEXT NOT NULL,        -- JSON {python, torch, triton, fla}
    git_revision TEXT NOT NULL,
    flags TEXT NOT NULL,           -- e.g. fla-guard-lifted
    timestamp TEXT NOT NULL
)
"""
RUNS_SCHEMA = """
CREATE TABLE IF NOT EXISTS profile_runs (
    run_id TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    device TEXT NOT NULL,
    versions TEXT NOT NULL,        -- JSON {python, torch, triton, fla}
    git_revision TEXT NOT NULL,
    flags TEXT NOT NULL,
    settings TEXT NOT NULL,        -- JSON: lengths, tokens or batch, heads, head_dim, dtype, modes, patterns, ...
    notes TEXT NOT NULL,           -- JSON list of sentences for the report
    unavailable TEXT NOT NULL      -- JSON list of [level, name, reason, mode]: asked for, not measured
)
"""
RUN_COLUMNS = ("run_id", "started_at", "device", "versions", "git_revision", "flags", "settings", "notes", "unavailable")
RUN_JSON = ("versions", "settings", "notes", "unavailable")
COLUMNS = (
    "run_id", "level", "name", "variant", "pattern", "backend", "role", "counterpart", "mode", "dtype", "batch", "length",
    "heads", "head_dim", "time_ms", "first_ms", "timer", "repeats", "peak_bytes", "extra_bytes", "input_bytes", "state_bytes",
    "memory_measure", "status", "note", "device", "versions", "git_revision", "flags", "timestamp",
)  # fmt: skip


def connect_profile(path: str | Path) -> sqlite3.Connection:
    """Opens (creating if needed) the results file at ``path`` in WAL mode, with the profiler's tables."""
    return open_sqlite(path, SCHEMA, RUNS_SCHEMA)


def insert_run(conn: sqlite3.Connection, run: dict[str, Any]) -> None:
    """Records one sweep; ``run`` has exactly the keys ``RUN_COLUMNS`` (JSON columns as Python values)."""
    if set(run) != set(RUN_COLUMNS):
        raise ValueError(f"run keys differ from the profile_runs columns: {sorted(set(run) ^ set(RUN_COLUMNS))}")
    values = [json.dumps(run[c]) if c in RUN_JSON else run[c] for c in RUN_COLUMNS]
    with conn:
        conn.execute(f"INSERT INTO profile_runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' for _ in RUN_COLUMNS)})", values)


def load_runs(conn: sqlite3.Connection, run_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """The sweeps with ``run_ids`` (all if None), oldest first, JSON columns decoded."""
    runs = []
    for r in conn.execute("SELECT * FROM profile_runs ORDER BY started_at, run_id"):
        if run_ids is None or r["run_id"] in run_ids:
            runs.append({c: json.loads(r[c]) if c in RUN_JSON else r[c] for c in RUN_COLUMNS})
    if run_ids is not None and len(runs) != len(set(run_ids)):
        missing = sorted(set(run_ids) - {r["run_id"] for r in runs})
        raise ValueError(f"no sweep {missing} in this results file")
    return runs


def merge_into(conn: sqlite3.Connection, path: str | Path) -> list[str]:
    """Copies the sweeps (and their rows) of the results file at ``path`` that ``conn`` lacks;
    returns their run ids."""
    other = connect_profile(path)
    try:
        have = {r[0] for r in conn.execute("SELECT run_id FROM profile_runs")}
        new = [r for r in load_runs(other) if r["run_id"] not in have]
        for run in new:
            insert_run(conn, run)
            for row in load_rows(other, [run["run_id"]]):
                insert_row(conn, {c: row[c] for c in COLUMNS})
    finally:
        other.close()
    return [r["run_id"] for r in new]


def insert_row(conn: sqlite3.Connection, row: dict[str, Any]) -> None:
    """Writes one point; ``row`` has exactly the keys ``COLUMNS``."""
    if set(row) != set(COLUMNS):
        raise ValueError(f"row keys differ from the profile columns: missing {sorted(set(COLUMNS) - set(row))}, extra {sorted(set(row) - set(COLUMNS))}")
    with conn:
        conn.execute(f"INSERT INTO profile ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})", [row[c] for c in COLUMNS])


def load_rows(conn: sqlite3.Connection, run_ids: list[str]) -> list[dict[str, Any]]:
    """The rows of the sweeps ``run_ids``, in the order they were measured."""
    marks = ", ".join("?" for _ in run_ids)
    return [dict(r) for r in conn.execute(f"SELECT * FROM profile WHERE run_id IN ({marks}) ORDER BY id", list(run_ids))]
