"""Recall tasks for causal language models: ``mqar``, ``induction`` and ``selective_copy``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqmix.patterns import Pattern
from seqmix.tasks.base import IGNORE, Batch, Task, check_int, register


def distinct_uniform(n: int, population: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, k]``: per row ``k`` distinct integers from ``[0, population)``, uniformly, in random order.

    Floyd's algorithm, vectorised over rows: for ``j = P - k .. P - 1`` draw ``t`` from ``[0, j]``
    and take ``t``, or ``j`` if ``t`` is taken already; then shuffle each row. ``O(n k^2)``.
    """
    chosen = torch.empty(n, k, dtype=torch.long)
    for i, j in enumerate(range(population - k, population)):
        t = torch.randint(0, j + 1, (n,), generator=generator)
        taken = (chosen[:, :i] == t[:, None]).any(dim=1)
        chosen[:, i] = torch.where(taken, j, t)
    order = torch.rand(n, k, generator=generator).argsort(dim=1)
    return chosen.gather(1, order)


def distinct_weighted(n: int, weights: torch.Tensor, k: int, generator: torch.Generator, chunk: int = 8192) -> torch.Tensor:
    """``[n, k]`` indices into ``weights [P]``: per row ``k`` distinct draws without replacement, each
    with probability proportional to the weights of those left (Gumbel top-k), a chunk of rows at a time."""
    log_w = weights.double().log()
    rows = []
    for start in range(0, n, chunk):
        u = torch.rand(min(chunk, n - start), weights.shape[0], generator=generator, dtype=torch.float64)
        gumbel = -(-u.clamp_min(1e-300).log()).log()
        rows.append((log_w + gumbel).topk(k, dim=1).indices)
    return torch.cat(rows)


@register
@dataclass(frozen=True)
class MQAR(Task):
    """Multi-query associative recall (Zoology, Arora et al. 2023).

    A sequence starts with ``num_kv_pairs`` pairs ``k_1 v_1 ... k_m v_m`` (keys distinct, from
    ``[1, V/2)``; values distinct, from ``[V/2, V)``). The rest of the sequence, ``2 m`` tokens on,
    holds every key once more as a query, at even offsets ``2 g`` with distinct gaps ``g`` drawn from
    the power law ``p(g) ∝ a (g + 1)^(a - 1)``; every other slot is a random token from ``[0, V)``.
    The label at a query is its key's value (the next token of the ideal sequence); every other
    label is ignored. Accuracy counts the answers only.
    """

    name = "mqar"
    pattern = Pattern.CAUSAL_SELF
    model = "decoder_lm"
    scores_labelled_tokens = True

    seq_len: int = 64
    num_kv_pairs: int = 4
    vocab_size: int = 8192
    power_a: float = 0.01

    def __post_init__(self):
        check_int(self.name, "seq_len", self.seq_len, 4)
        check_int(self.name, "num_kv_pairs", self.num_kv_pairs, 1)
        check_int(self.name, "vocab_size", self.vocab_size, 4)
        if self.seq_len % 2:
            raise ValueError(f"mqar: seq_len must be even, got {self.seq_len}")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"mqar: seq_len={self.seq_len} must hold 4 * num_kv_pairs = {4 * self.num_kv_pairs} tokens (pairs and queries)")
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"mqar: vocab_size={self.vocab_size} has fewer than num_kv_pairs={self.num_kv_pairs} distinct keys")
        if not isinstance(self.power_a, int | float) or not 0 < self.power_a <= 1:
            raise ValueError(f"mqar: power_a must be a float in (0, 1], got {self.power_a!r}")

    def _make(self, split: str, n: int, seed: int) -> Batch:
        g = self.generator(split, seed)
        V, T, m = self.vocab_size, self.seq_len, self.num_kv_pairs
        half = V // 2
        keys = 1 + distinct_uniform(n, half - 1, m, g)  # (n, m) in [1, V/2)
        values = half + distinct_uniform(n, V - half, m, g)  # (n, m) in [V/2, V)
        space = (T - 2 * m) // 2
        i = torch.arange(1, space + 1, dtype=torch.float64)
        gaps = distinct_weighted(n, self.power_a * i ** (self.power_a - 1), m, g)  # (n, m) in [0, space)

        input_ids = torch.randint(0, V, (n, T), generator=g)
        input_ids[:, 0 : 2 * m : 2] = keys
        input_ids[:, 1 : 2 * m : 2] = values
        queries = 2 * m + 2 * gaps
        input_ids.scatter_(1, queries, keys)
        labels = torch.full((n, T), IGNORE, dtype=torch.long)
        labels.scatter_(1, queries, values)
        return {"input_ids": input_ids, "labels": labels}


@register
@dataclass(frozen=True)
class Induction(Task):
    """Induction heads: random tokens from ``[0, V - 1)`` with the special token ``V - 1`` once at a
    random position ``p <= T - 3``, followed by an answer token; the sequence ends with the special
    token again, labelled with the answer (the token that followed it earlier). One label per sequence.
    """

    name = "induction"
    pattern = Pattern.CAUSAL_SELF
    model = "decoder_lm"
    scores_labelled_tokens = True

    seq_len: int = 256
    vocab_size: int = 16

    def __post_init__(self):
        check_int(self.name, "seq_len", self.seq_len, 4)
        check_int(self.name, "vocab_size", self.vocab_size, 3)

    @property
    def special(self) -> int:
        return self.vocab_size - 1

    def _make(self, split: str, n: int, seed: int) -> Batch:
        g = self.generator(split, seed)
        T = self.seq_len
        input_ids = torch.randint(0, self.special, (n, T), generator=g)
        first = torch.randint(0, T - 2, (n, 1), generator=g)
        input_ids.scatter_(1, first, self.special)
        answer = input_ids.gather(1, first + 1)
        input_ids[:, -1] = self.special
        labels = torch.full((n, T), IGNORE, dtype=torch.long)
        labels[:, -1:] = answer
        return {"input_ids": input_ids, "labels": labels}


@register
@dataclass(frozen=True)
class SelectiveCopy(Task):
    """Selective copying (MAD, Poli et al. 2024): ``num_tokens`` content tokens from ``[1, V - 1)``
    scattered (in random positions, order kept) among blank tokens ``0`` in the first
    ``T - num_tokens`` positions; then the separator ``V - 1``, after which the model writes the
    content tokens in order (teacher forcing: the input after the separator is the answer so far).
    Labels: the ``num_tokens`` answers at the last ``num_tokens`` positions.

    ``T = 8, k = 2``: input ``0 5 0 0 3 0 | 15 5``, labels ``- - - - - - 5 3``.
    """

    name = "selective_copy"
    pattern = Pattern.CAUSAL_SELF
    model = "decoder_lm"
    scores_labelled_tokens = True

    seq_len: int = 256
    num_tokens: int = 16
    vocab_size: int = 16

    def __post_init__(self):
        check_int(self.name, "num_tokens", self.num_tokens, 1)
        check_int(self.name, "vocab_size", self.vocab_size, 3)
        check_int(self.name, "seq_len", self.seq_len, 2 * self.num_tokens)

    @property
    def separator(self) -> int:
        return self.vocab_size - 1

    def _make(self, split: str, n: int, seed: int) -> Batch:
        g = self.generator(split, seed)
        T, k = self.seq_len, self.num_tokens
        region = T - k
        content = torch.randint(1, self.separator, (n, k), generator=g)
        positions = distinct_uniform(n, region, k, g).sort(dim=1).values
        input_ids = torch.zeros(n, T, dtype=torch.long)
        input_ids.scatter_(1, positions, content)
        input_ids[:, region] = self.separator
        input_ids[:, region + 1 :] = content[:, :-1]
        labels = torch.full((n, T), IGNORE, dtype=torch.long)
        labels[:, region:] = content
        return {"input_ids": input_ids, "labels": labels}
