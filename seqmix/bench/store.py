"""The results store: one SQLite file (WAL mode), one row per run in the table ``runs``.

A run's id is a hash of its resolved config (``RunConfig.to_json``), so a finished run is found
and skipped when a suite runs again (resume). Every change commits at once: a process killed at
any moment (even by SIGKILL) loses only the run it was in, which stays ``running`` and is run
again next time. Other tools may keep their own tables in the same file: open it with ``connect``.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import platform
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import torch

import seqmix
from seqmix.bench.config import RunConfig

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,                    -- hash of the resolved config
    suite TEXT NOT NULL,
    task TEXT NOT NULL,
    mixer TEXT NOT NULL,                    -- "gla", or "gla+gla+softmax" for one per layer
    pattern TEXT NOT NULL,                  -- the task's pattern: NS, CS, NC or CC
    model TEXT NOT NULL,                    -- the model kind
    params INTEGER,
    config TEXT NOT NULL,                   -- the resolved RunConfig as JSON
    seed INTEGER NOT NULL,
    metric TEXT,                            -- the task's headline metric
    metrics TEXT,                           -- held-out metrics as JSON {name: value}
    details TEXT,                           -- JSON: steps, early stop, eval history, backends, ...
    tokens_per_s REAL,
    peak_memory_bytes INTEGER,
    wall_s REAL,
    device TEXT NOT NULL,
    versions TEXT NOT NULL,                 -- JSON {python, torch, triton, seqmix}
    git_revision TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    error TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT
)
"""
COLUMNS = (
    "id", "suite", "task", "mixer", "pattern", "model", "params", "config", "seed", "metric", "metrics", "details",
    "tokens_per_s", "peak_memory_bytes", "wall_s", "device", "versions", "git_revision", "status", "error",
    "started_at", "finished_at",
)  # fmt: skip
JSON_COLUMNS = ("config", "metrics", "details", "versions")


def open_sqlite(path: str | Path, *schemas: str) -> sqlite3.Connection:
    """Opens (creating it and its folder if needed) the SQLite file at ``path`` in WAL mode, with
    rows by column name, and runs each ``CREATE TABLE IF NOT EXISTS`` of ``schemas``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=60)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    with conn:
        for schema in schemas:
            conn.execute(schema)
    return conn


def connect(path: str | Path) -> sqlite3.Connection:
    """Opens (creating if needed) the store at ``path`` in WAL mode, with the ``runs`` table."""
    return open_sqlite(path, SCHEMA)


def run_id(config: RunConfig) -> str:
    """The run's identity: the first 16 hex digits of the SHA-256 of its canonical JSON."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Python, torch, triton (or ``"absent"``) and seqmix versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "seqmix": seqmix.__version__,
    }


def git_revision() -> str:
    """``$SEQMIX_GIT_REVISION`` when set (a copied tree, whose ``.git`` may be missing or stale);
    else the source tree's git commit (``+dirty`` with uncommitted changes); else ``"unknown"``."""
    if os.environ.get("SEQMIX_GIT_REVISION"):
        return os.environ["SEQMIX_GIT_REVISION"]
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def status(conn: sqlite3.Connection, rid: str) -> str | None:
    """The status of run ``rid`` (``running``, ``done``, ``failed``), or ``None`` if never started."""
    row = conn.execute("SELECT status FROM runs WHERE id = ?", (rid,)).fetchone()
    return None if row is None else row["status"]


def start_run(
    conn: sqlite3.Connection, config: RunConfig, *, suite: str, pattern: str, model: str, versions: dict[str, str], git_revision: str
) -> str:
    """Records run ``config`` as ``running`` (replacing an unfinished or failed row) and returns its id."""
    rid = run_id(config)
    with conn:
        conn.execute(
            "INSERT OR REPLACE INTO runs (id, suite, task, mixer, pattern, model, config, seed, device, versions, git_revision, "
            "status, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?)",
            (rid, suite, config.task, config.mixer_label, pattern, model, config.to_json(), config.seed, config.device,
             json.dumps(versions), git_revision, _now()),
        )  # fmt: skip
    return rid


def finish_run(
    conn: sqlite3.Connection,
    rid: str,
    *,
    params: int,
    metric: str,
    metrics: dict[str, float],
    details: dict[str, Any],
    tokens_per_s: float,
    peak_memory_bytes: int | None,
    wall_s: float,
) -> None:
    """Records the results of run ``rid`` and marks it ``done``."""
    with conn:
        conn.execute(
            "UPDATE runs SET params = ?, metric = ?, metrics = ?, details = ?, tokens_per_s = ?, peak_memory_bytes = ?, "
            "wall_s = ?, status = 'done', error = NULL, finished_at = ? WHERE id = ?",
            (params, metric, json.dumps(metrics), json.dumps(details), tokens_per_s, peak_memory_bytes, wall_s, _now(), rid),
        )


def fail_run(conn: sqlite3.Connection, rid: str, error: str, *, wall_s: float) -> None:
    """Marks run ``rid`` ``failed`` with its error (the traceback)."""
    with conn:
        conn.execute("UPDATE runs SET status = 'failed', error = ?, wall_s = ?, finished_at = ? WHERE id = ?", (error, wall_s, _now(), rid))


def load_runs(conn: sqlite3.Connection, status: str | None = None) -> list[dict[str, Any]]:
    """All runs (or those with ``status``) as dicts, JSON columns decoded, oldest first."""
    query = "SELECT * FROM runs" + (" WHERE status = ?" if status else "") + " ORDER BY started_at, id"
    rows = []
    for row in conn.execute(query, (status,) if status else ()):
        d = dict(row)
        for key in JSON_COLUMNS:
            if d[key] is not None:
                d[key] = json.loads(d[key])
        rows.append(d)
    return rows


def export_csv(conn: sqlite3.Connection, path: str | Path) -> Path:
    """Writes every run, every column (JSON columns as JSON text), to a CSV file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(conn.execute(f"SELECT {', '.join(COLUMNS)} FROM runs ORDER BY started_at, id"))
    return path
