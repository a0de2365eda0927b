"""``seqmix bench --sequence-parallel P``: a run split over 2 gloo ranks trains as the run in one process."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from seqmix.bench import runner
from seqmix.bench.config import RunConfig
from seqmix.cli import main
from tests.distributed.launch import run_ranks
from tests.helpers import rel_err

MIXERS = {"softmax": "softmax", "gla": "gla", "hybrid": ("softmax", "gla")}
FIELDS = {
    "task": "mqar",
    "task_options": {"seq_len": 16, "num_kv_pairs": 2, "vocab_size": 32},
    "d_model": 16,
    "n_layers": 2,
    "n_heads": 2,
    "batch_size": 4,
    "train_size": 12,
    "max_steps": 3,
    "eval_size": 6,
    "eval_every": 1,
    "lr": 1e-2,
    "device": "cpu",
    "threads": 1,
}


def _train(config: RunConfig) -> dict:
    """Final step's training loss, held-out metrics (evaluated after every step) and final parameters."""
    models = []
    build = runner.build

    def recording_build(c):
        task, model = build(c)
        models.append(model)
        return task, model

    runner.build = recording_build
    try:
        result = runner.train(config)
    finally:
        runner.build = build
    return {
        "train_loss": result.details["train_loss"],
        "evals": result.details["evals"],
        "metrics": result.metrics,
        "params": [p.detach().flatten().tolist() for p in models[0].parameters()],
        "sequence_parallel": result.details["sequence_parallel"],
    }


def _ranks(rank: int, world_size: int) -> dict:
    out = {key: _train(RunConfig(mixer=mixer, sequence_parallel=world_size, **FIELDS)) for key, mixer in MIXERS.items()}
    odd = dict(FIELDS, task_options={**FIELDS["task_options"], "seq_len": 18})  # 18 tokens: not 4 zigzag chunks
    try:
        runner.train(RunConfig(mixer="softmax", sequence_parallel=world_size, **odd))
    except ValueError as e:
        out["refused"] = str(e)
    return out


def test_two_ranks_train_as_one_process(tmp_path):
    ranks = run_ranks(_ranks, 2, tmp_path)
    for key, mixer in MIXERS.items():
        expected = _train(RunConfig(mixer=mixer, **FIELDS))
        assert expected["sequence_parallel"] == 1
        for got in (r[key] for r in ranks):
            assert got["sequence_parallel"] == 2
            assert abs(got["train_loss"] - expected["train_loss"]) <= 1e-6 * abs(expected["train_loss"]), key
            assert [s for s, _ in got["evals"]] == [1, 2, 3]
            for (_, a), (_, b) in zip(got["evals"], expected["evals"]):
                assert abs(a - b) <= 1e-6, key
            for name, value in expected["metrics"].items():
                assert abs(got["metrics"][name] - value) <= 1e-6 * max(1.0, abs(value)), (key, name)
            for a, b in zip(got["params"], expected["params"], strict=True):
                assert rel_err(torch.tensor(a), torch.tensor(b)) <= 1e-6, key
    for r in ranks:
        assert "sequence length 18" in r["refused"] and "divisible by 4" in r["refused"]


def test_cli_refuses_sequence_parallel_without_torchrun(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ["bench", "--suite", "quick", "--mixers", "gla", "--sequence-parallel", "2", "--db", str(tmp_path / "r.db")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "--sequence-parallel 2 needs 2 processes launched by torchrun (WORLD_SIZE=1)" in result.output
    assert "torchrun --nproc_per_node 2 $(which seqmix) bench --sequence-parallel 2" in result.output
    assert not (tmp_path / "r.db").exists()


def test_plan_leaves_out_models_other_than_decoder_lm(tmp_path):
    args = ["bench", "--suite", "quick", "--mixers", "gla", "--sequence-parallel", "2", "--dry-run", "--db", str(tmp_path / "r.db")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "not run: listops/gla: sequence parallelism serves decoder_lm models, the task needs encoder_classifier" in result.output
    planned = [line.split()[1] for line in result.output.splitlines()[2:] if line.split() and line.split()[0].isdigit()]
    assert planned and set(planned) <= {"mqar", "induction", "selective_copy", "text_lm"}
