import math

import pytest
import torch

from seqmix.bench.config import RunConfig
from seqmix.bench.runner import SavedTensorBytes, _forward, _optimizer, _scored, build, train
from seqmix.models import count_parameters
from tests.bench.conftest import TINY


def test_two_steps_end_to_end_on_a_real_task():
    config = RunConfig(task="mqar", mixer="gla", task_options={"seq_len": 16, "num_kv_pairs": 2, "vocab_size": 32}, **TINY)
    result = train(config)
    d = result.details
    assert d["steps"] == 2 and d["train_tokens"] == 4 * 16 and d["epochs"] == 1.0 and not d["stopped_early"]
    assert result.params == count_parameters(build(config)[1])
    assert result.metric == "accuracy" and set(result.metrics) >= {"accuracy", "loss"} and 0 <= result.metrics["accuracy"] <= 1
    assert result.tokens_per_s > 0 and result.wall_s > d["train_s"] > 0 and d["seq_len"] == 16
    assert d["backends"] == ["gla:auto=chunked"] and d["memory_measure"].startswith("cpu estimate")
    assert result.peak_memory_bytes > 4 * 4 * result.params  # the model state plus what backward needs
    assert train(config).metrics == result.metrics  # seeded: the same run gives the same numbers


def test_labelled_positions_only_scores_as_the_full_logits():
    config = RunConfig(task="mqar", mixer="gla", task_options={"seq_len": 16, "num_kv_pairs": 2, "vocab_size": 32}, **TINY)
    task, model = build(config)
    assert task.scores_labelled_tokens
    batch = task.make_split("train", 4, 0)
    logits, scored = _scored(task, model, batch)
    assert logits.shape == (4 * 2, 32)  # two labelled queries per sequence
    full = _forward(model, batch)
    torch.testing.assert_close(task.loss(logits, scored), task.loss(full, batch))
    for name, (total, count) in task.metrics(full, batch).items():
        assert task.metrics(logits, scored)[name] == (pytest.approx(total), count), name


def test_early_stop_at_the_target_and_threads_restored(fake_tasks):
    threads = torch.get_num_threads()
    config = RunConfig(task="fake_shift", mixer="softmax", **TINY | {"max_steps": 6, "train_size": 24, "eval_every": 1, "target": 0.0, "threads": 1})
    result = train(config)
    assert result.details["stopped_early"] and result.details["steps"] == 1 and result.details["planned_steps"] == 6
    assert [step for step, _ in result.details["evals"]] == [1]
    assert result.tokens_per_s > 0  # from the first step, the only one
    assert result.details["threads"] == 1 and torch.get_num_threads() == threads


def test_schedule_warms_up_then_follows_a_cosine():
    model = torch.nn.Linear(2, 2)
    config = RunConfig(task="t", mixer="softmax", lr=1.0, warmup=0.2)
    _, schedule = _optimizer(model, config, total_steps=10)
    factors = [schedule.lr_lambdas[0](s) for s in range(11)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)])
    assert factors[-1] == pytest.approx(0.0)


def test_saved_tensor_bytes_counts_distinct_storages_less_excluded():
    a, b = torch.randn(8, 4, requires_grad=True), torch.randn(4, 16)
    w = torch.randn(16, 3, requires_grad=True)
    with SavedTensorBytes(exclude={w.untyped_storage().data_ptr()}) as saved:
        h = a @ b
        (h @ w).sum()
    # a @ b saves b (for a's gradient); h @ w saves h (for w's gradient) and w (excluded)
    assert saved.nbytes == b.numel() * 4 + h.numel() * 4


def test_device_must_be_resolved():
    with pytest.raises(ValueError, match="must be resolved"):
        train(RunConfig(task="mqar", mixer="softmax"))
