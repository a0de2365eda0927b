"""``seqmix profile`` end to end at tiny sizes on the CPU, and the sweep's OOM, time-cap and budget rules."""

import json
import sqlite3
import sys
import time
import types

import pytest
import torch
from click.testing import CliRunner

from seqmix import Pattern
from seqmix.bench import profile as prof
from seqmix.bench.profile_cases import Case, Run
from seqmix.bench.profile_store import COLUMNS, connect_profile, load_rows
from seqmix.cli import main

TINY = ["--device", "cpu", "--heads", "2", "--head-dim", "8", "--dtype", "fp32", "--warmup-ms", "0", "--rep-ms", "0"]


def test_profile_command_writes_rows_report_and_plots(tmp_path):
    out = tmp_path / "out"
    args = ["profile", *TINY, "--lengths", "16,32", "--tokens", "64", "--ops", "long_conv", "--mixers", "local",
            "--peers", "fla.chunk_gla", "--mode", "fwd,fwdbwd,step", "--step-batches", "2", "--window", "8", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "time vs plain" in result.output  # the summary ends the output

    conn = sqlite3.connect(out / "profile.db")
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM profile ORDER BY id")]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert set(rows[0]) == {"id", *COLUMNS}
    # fwd and fwdbwd: 3 op cases + 3 mixer cases, 2 lengths; step: 2 op + 2 mixer cases x 2 lengths.
    assert len(rows) == 2 * 6 * 2 + 4 * 2
    cases = {(r["level"], r["name"], r["variant"], r["backend"], r["role"]) for r in rows}
    assert ("op", "softmax_attention", "full", "reference", "plain") in cases
    assert ("op", "long_conv", "", "fft", "") in cases and ("mixer", "local", "", "sdpa", "") in cases
    assert {r["batch"] for r in rows if r["mode"] != "step"} == {4, 2}  # 64 tokens // T
    assert {r["batch"] for r in rows if r["mode"] == "step"} == {2}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]
    assert all(r["time_ms"] > 0 and r["first_ms"] > 0 and r["timer"] == "perf_counter" and r["repeats"] >= 3 for r in rows)
    assert all(r["peak_bytes"] >= r["extra_bytes"] > 0 and r["memory_measure"] == "cpu.live_tensor_bytes" for r in rows)
    assert all(r["state_bytes"] > 0 for r in rows if r["mode"] == "step")
    assert json.loads(rows[0]["versions"])["torch"] == torch.__version__ and rows[0]["git_revision"]
    (run,) = [dict(r) for r in conn.execute("SELECT * FROM profile_runs")]
    assert run["run_id"] == rows[0]["run_id"] and json.loads(run["settings"])["lengths"] == [16, 32]
    assert ["peer", "fla.chunk_gla"] == json.loads(run["unavailable"])[0][:2]
    conn.close()

    md = (out / "profile.md").read_text()
    assert "| level | case | 16 | 32 |" in md  # lengths as columns
    assert "## fwdbwd · CS" in md and "## step · CS · batch 2" in md and "### Efficiency length (tokens)" in md
    assert "fla.chunk_gla" in md  # a peer not installed (or not runnable on the CPU) is listed, not skipped
    assert "long_conv [fft]" in md and "(baseline: sdpa)" in md
    for name in ("profile_fwd_CS.png", "profile_fwdbwd_CS.png", "profile_step_CS_B2.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,message", [
    (["--tokens", "64", "--batch", "2"], "not both"),
    (["--mixers", "nope"], "unknown mixer"),
    (["--mode", "train"], "--mode"),
    (["--patterns", "XY"], "unknown pattern"),
    (["--lengths", "0,16"], "positive"),
])  # fmt: skip
def test_bad_options_are_refused(tmp_path, args, message):
    result = CliRunner().invoke(main, ["profile", *TINY, "--out", str(tmp_path), *args])
    assert result.exit_code != 0 and message in result.output


def sweep(**changes):
    base = dict(
        lengths=(16, 32, 64), tokens=None, batch=1, heads=1, head_dim=4, dtype="fp32", modes=("fwd",),
        patterns=(Pattern.CAUSAL_SELF,), device=torch.device("cpu"), window=4, step_batches=(1,), warmup_ms=0.0,
        rep_ms=0.0, time_cap_s=10.0, budget_s=None,
    )  # fmt: skip
    return prof.Sweep(**{**base, **changes})


def fake_case(make):
    return Case("op", "fake", "", "reference", frozenset(Pattern), make)


def swept(tmp_path, case, s):
    conn = connect_profile(tmp_path / f"{len(list(tmp_path.iterdir()))}.db")
    meta = {"dtype": "fp32", "device": "cpu", "versions": {}, "git_revision": "x", "flags": []}
    prof.run_sweep([case], s, conn=conn, run_id="r", meta=meta, echo=lambda line: None)
    rows = load_rows(conn, ["r"])
    conn.close()
    return [(r["length"], r["status"]) for r in rows]


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(tmp_path):
    def make(shape):
        if shape.length == 32:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        x = torch.randn(shape.length)
        return Run(lambda: x * 2, [x], [])

    assert swept(tmp_path, fake_case(make), sweep()) == [(16, "ok"), (32, "OOM"), (64, "ok")]


def test_errors_are_recorded_with_their_text(tmp_path):
    def make(shape):
        raise ValueError("bad shape\nmore")

    assert swept(tmp_path, fake_case(make), sweep(lengths=(16,))) == [(16, "error: ValueError: bad shape")]


def test_slow_points_are_skipped_by_the_time_cap(tmp_path):
    def make(shape):
        x = torch.randn(1)
        return Run(lambda: time.sleep(shape.length * 1e-4) or x, [x], [])

    # 16 -> 1.6 ms measured; 32 -> predicted 6.4 ms (quadratic from one point) > 5 ms cap: skipped, and 64 after it.
    statuses = swept(tmp_path, fake_case(make), sweep(time_cap_s=0.005))
    assert statuses[0] == (16, "ok")
    assert [s.startswith("skipped: over time cap (predicted") for _, s in statuses[1:]] == [True, True]
    # Warm calls over the cap, with nothing to predict from: skipped after them.
    statuses = swept(tmp_path, fake_case(make), sweep(lengths=(64,), time_cap_s=0.001))
    assert statuses[0][1].startswith("skipped: over time cap (a warm call took")


def test_the_run_budget_skips_what_is_left(tmp_path):
    def make(shape):
        raise AssertionError("not run")

    assert {s for _, s in swept(tmp_path, fake_case(make), sweep(budget_s=-1.0))} == {"skipped: over run budget (-1 s)"}


def test_predicted_time_follows_the_measured_slope():
    assert prof.predicted_ms([], 10, 1) is None
    assert prof.predicted_ms([(10, 1, 1.0)], 20, 1) == pytest.approx(4.0)  # quadratic from one point
    assert prof.predicted_ms([(10, 4, 1.0)], 20, 2) == pytest.approx(2.0)  # ... at a fixed number of tokens
    assert prof.predicted_ms([(10, 1, 1.0), (20, 1, 2.0)], 40, 1) == pytest.approx(4.0)  # linear
    assert prof.predicted_ms([(10, 1, 1.0), (20, 1, 1.0)], 40, 1) == pytest.approx(2.0)  # never below linear
    assert prof.predicted_ms([(10, 4, 1.0), (20, 2, 1.0)], 40, 1) == pytest.approx(1.0)  # linear work at fixed tokens
    step = (0.0, 1.0)  # one decoding step: constant (a recurrent state) to linear (a KV cache)
    assert prof.predicted_ms([(10, 1, 1.0)], 40, 1, step) == pytest.approx(4.0)
    assert prof.predicted_ms([(10, 1, 1.0), (20, 1, 1.0)], 40, 1, step) == pytest.approx(1.0)


def test_lift_fla_guard_sets_the_flag_and_says_so(monkeypatch):
    chunk_o = types.ModuleType("fla.ops.common.chunk_o")
    chunk_o.TRITON_ABOVE_3_7_1 = False
    for name in ("fla", "fla.ops", "fla.ops.common"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.common.chunk_o", chunk_o)
    sys.modules["fla.ops.common"].chunk_o = chunk_o
    note = prof.lift_fla_hopper_guard()
    assert chunk_o.TRITON_ABOVE_3_7_1 is True
    assert "TRITON_ABOVE_3_7_1 = True (was False)" in note and "timing only" in note


def test_lift_fla_guard_without_fla_lifts_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)
    assert "nothing lifted" in prof.lift_fla_hopper_guard()


def test_sweeps_made_apart_merge_into_one_report(tmp_path):
    common = ["profile", *TINY, "--lengths", "16", "--tokens", "32", "--mixers", "none", "--peers", "none", "--mode", "fwd"]
    for part in ("a", "b"):
        ops = "long_conv" if part == "a" else "linear_attention"
        result = CliRunner().invoke(main, [*common, "--ops", ops, "--out", str(tmp_path / part)])
        assert result.exit_code == 0, result.output
    merged = tmp_path / "merged.db"
    args = ["profile", "--report-only", "--db", str(merged), "--out", str(tmp_path / "m")]
    result = CliRunner().invoke(main, [*args, "--merge", str(tmp_path / "a" / "profile.db"), "--merge", str(tmp_path / "b" / "profile.db")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "m" / "profile.md").read_text()
    assert md.count("- run `") == 2 and "long_conv [fft]" in md and "linear_attention/elu" in md
    # Merging again adds nothing; an unknown run id is refused.
    result = CliRunner().invoke(main, [*args, "--merge", str(tmp_path / "a" / "profile.db")])
    assert "nothing new" in result.output
    result = CliRunner().invoke(main, [*args, "--runs", "nope"])
    assert result.exit_code != 0 and "no sweep" in result.output
