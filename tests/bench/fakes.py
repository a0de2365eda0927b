"""Tiny fake tasks for the benchmark's tests, installed into ``seqmix.tasks`` by ``install``."""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

import seqmix.tasks
from seqmix.patterns import Pattern


@dataclasses.dataclass(frozen=True)
class Shift:
    """Causal self: predict the previous token. ``sleep`` seconds of delay when making a split;
    ``fail`` raises there (a failing run)."""

    seq_len: int = 16
    vocab_size: int = 12
    sleep: float = 0.0
    fail: bool = False

    name = "fake_shift"
    pattern = Pattern.CAUSAL_SELF
    model = "decoder_lm"
    metric = "accuracy"
    higher_is_better = True
    scores_labelled_tokens = False
    num_classes = None

    def make_split(self, split: str, n: int, seed: int) -> dict[str, torch.Tensor]:
        if self.fail:
            raise RuntimeError("fake failure")
        time.sleep(self.sleep)
        g = torch.Generator().manual_seed(seed * 2 + (split == "train"))
        x = torch.randint(0, self.vocab_size, (n, self.seq_len), generator=g)
        labels = torch.full_like(x, -100)
        labels[:, 1:] = x[:, :-1]
        return {"input_ids": x, "labels": labels}

    def loss(self, logits, batch):
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)

    def metrics(self, logits, batch):
        keep = batch["labels"] != -100
        correct = ((logits.argmax(-1) == batch["labels"]) & keep).sum()
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
        return {"accuracy": (float(correct), int(keep.sum())), "loss": (float(loss), int(keep.sum()))}


@dataclasses.dataclass(frozen=True)
class Pairs(Shift):
    """Noncausal cross (an encoder-decoder): copy the context."""

    name = "fake_pairs"
    pattern = Pattern.NONCAUSAL_CROSS
    model = "encoder_decoder"

    def make_split(self, split: str, n: int, seed: int) -> dict[str, torch.Tensor]:
        batch = super().make_split(split, n, seed)
        return {"input_ids": batch["input_ids"], "context_ids": batch["input_ids"], "labels": batch["input_ids"]}


FAKES = {cls.name: cls for cls in (Shift, Pairs)}


def install(setattr) -> None:
    """Adds the fakes to the task registry functions via ``setattr(obj, name, value)`` (pytest's
    ``monkeypatch.setattr``, or the builtin in a subprocess)."""
    real_list, real_options, real_build = seqmix.tasks.list_tasks, seqmix.tasks.task_options, seqmix.tasks.build_task
    setattr(seqmix.tasks, "list_tasks", lambda: sorted([*real_list(), *FAKES]))
    setattr(seqmix.tasks, "task_options", lambda name: {f.name: f.default for f in dataclasses.fields(FAKES[name])} if name in FAKES else real_options(name))
    setattr(seqmix.tasks, "build_task", lambda name, **o: FAKES[name](**o) if name in FAKES else real_build(name, **o))
