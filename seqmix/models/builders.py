"""Model builders: backbones of pre-norm blocks around any registered mixer, in four kinds.

| kind                 | mixers per block                          | output                 |
| -------------------- | ----------------------------------------- | ---------------------- |
| `encoder_classifier` | noncausal self                            | ``[B, num_classes]``   |
| `decoder_lm`         | causal self                               | ``[B, T, vocab]``      |
| `encoder_decoder`    | encoder: noncausal self; decoder: causal self + noncausal cross | ``[B, T, vocab]`` |
| `aligned_transducer` | causal self + causal cross (aligned)      | ``[B, T, vocab]``      |

Every model: a token embedding, ``n_layers`` blocks (``model.blocks``), a final RMSNorm
(``model.norm``) and an untied linear head (``model.head``). Untied because the classifier's head
has no embedding to tie to, and one rule for all kinds keeps parameter counts comparable. There is
no positional embedding: the mixers carry their own positions (softmax uses RoPE).

``mixer`` names one mixer for every layer or a list, one per layer (hybrids). ``mixer_options``
go to every mixer; a key that names a registered mixer holds options for that mixer only, e.g.
``{"backend": "reference", "local": {"window": 32}}``. Cross mixers are built with the same name
and options as their layer's self mixer.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from seqmix.mixers.base import Mixer
from seqmix.mixers.registry import build_mixer, list_mixers, mixer_options as registered_options
from seqmix.models.generation import generate
from seqmix.models.layers import Block
from seqmix.patterns import Pattern

MODEL_KINDS = ("encoder_classifier", "decoder_lm", "encoder_decoder", "aligned_transducer")


# -- building the mixers ---------------------------------------------------------------------
def layer_mixers(mixer: str | list[str], n_layers: int) -> list[str]:
    """One mixer name per layer: ``mixer`` repeated, or the list itself (its length must be ``n_layers``)."""
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if isinstance(mixer, str):
        return [mixer] * n_layers
    if not isinstance(mixer, (list, tuple)) or not all(isinstance(m, str) for m in mixer):
        raise TypeError(f"mixer must be a mixer name or a list of names, one per layer; got {mixer!r}")
    if len(mixer) != n_layers:
        raise ValueError(f"mixer lists {len(mixer)} names {list(mixer)}, expected one per layer (n_layers={n_layers})")
    return list(mixer)


def _options_for(name: str, mixer_options: dict | None, max_len: int | None) -> dict:
    """The options of mixer ``name``: the shared ones, then its own (a key naming the mixer)."""
    if not isinstance(mixer_options, dict | None):
        raise TypeError(f"mixer_options must be a dict or None, got {type(mixer_options).__name__}")
    options = dict(mixer_options or {})
    names = set(list_mixers())
    for key, value in options.items():
        if key in names and not isinstance(value, dict):
            raise TypeError(f"mixer_options[{key!r}] names a mixer and must be a dict of its options, got {value!r}")
    shared = {k: v for k, v in options.items() if k not in names}
    own = options.get(name, {})
    resolved = {**shared, **own}
    if max_len is not None and "max_len" in registered_options(name):
        resolved.setdefault("max_len", max_len)
    return resolved


def _mixer(name: str, pattern: Pattern, where: str, *, d_model: int, n_heads: int, mixer_options: dict | None, max_len: int | None) -> Mixer:
    """Builds mixer ``name`` and checks at once that it serves ``pattern`` (its own error, with ``where``)."""
    mixer = build_mixer(name, d_model, n_heads, **_options_for(name, mixer_options, max_len))
    try:
        mixer.check_pattern(pattern)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return mixer


def _blocks(kind: str, part: str, names: list[str], *, causal: bool, cross: Pattern | None, d_model: int, **build) -> nn.ModuleList:
    self_pattern = Pattern.of(causal=causal, cross=False)
    blocks = []
    for i, name in enumerate(names):
        where = f"{kind} {part}layer {i}"
        mixer = _mixer(name, self_pattern, where, d_model=d_model, **build)
        cross_mixer = None if cross is None else _mixer(name, cross, f"{where} (cross)", d_model=d_model, **build)
        blocks.append(Block(d_model, mixer, causal=causal, cross=cross_mixer, cross_causal=cross is not None and cross.causal))
    return nn.ModuleList(blocks)


# -- input checks ----------------------------------------------------------------------------
def _check_ids(name: str, ids: torch.Tensor, max_len: int | None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2:
        got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be a long tensor [batch, time], got {got}")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} must not be empty (time dimension is 0)")
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"{name} has length {ids.shape[1]}, more than the model's max_len={max_len}")


def _check_mask(name: str, mask: torch.Tensor | None, ids: torch.Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != ids.shape:
        got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor of shape {list(ids.shape)}, got {got}")


# -- the models ------------------------------------------------------------------------------
class SequenceModel(nn.Module):
    """Shared parts: ``embed`` (vocab -> d), ``blocks``, ``norm``, ``head``; subclasses define ``forward``."""

    kind: ClassVar[str] = ""
    uses_context: ClassVar[bool] = False

    def __init__(self, *, vocab_size: int, d_model: int, blocks: nn.ModuleList, out_features: int, max_len: int | None):
        super().__init__()
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = blocks
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, out_features, bias=False)

    def _check_inputs(self, input_ids, context_ids, mask, context_mask) -> None:
        _check_ids("input_ids", input_ids, self.max_len)
        _check_mask("mask", mask, input_ids)
        if not self.uses_context:
            if context_ids is not None or context_mask is not None:
                raise ValueError(f"{self.kind} takes no context_ids or context_mask")
            return
        if context_ids is None:
            raise ValueError(f"{self.kind} needs context_ids [batch, context length]")
        _check_ids("context_ids", context_ids, self.max_len)
        if context_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"context_ids has batch {context_ids.shape[0]}, expected {input_ids.shape[0]} (as input_ids)")
        _check_mask("context_mask", context_mask, context_ids)

    def _decode(self, x, mask, context=None, context_mask=None, logits_at=None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask=mask, context=context, context_mask=context_mask)
        return self.head(self.norm(x if logits_at is None else x[logits_at]))


class DecoderLM(SequenceModel):
    """Causal language model: ``input_ids [B, T]`` -> next-token logits ``[B, T, vocab]``."""

    kind = "decoder_lm"

    def forward(self, input_ids, *, context_ids=None, mask=None, context_mask=None, logits_at=None) -> torch.Tensor:
        """``logits_at [B, T]`` (bool): the logits of those positions only, ``[N, vocab]`` in
        row-major order, e.g. where a task has labels (the head's cost falls with them)."""
        self._check_inputs(input_ids, context_ids, mask, context_mask)
        _check_mask("logits_at", logits_at, input_ids)
        return self._decode(self.embed(input_ids), mask, logits_at=logits_at)  # (B, T, vocab) or (N, vocab)

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The prompt ``[B, T]`` followed by ``max_new_tokens`` new tokens (``temperature=0``: greedy);
        see :func:`seqmix.models.generation.generate`."""
        return generate(
            self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_token_id=eos_token_id, attention_mask=attention_mask, generator=generator,
        )


class EncoderClassifier(SequenceModel):
    """Noncausal encoder, then the mean of the final hidden states over real tokens:
    ``input_ids [B, T]`` -> ``[B, num_classes]``."""

    kind = "encoder_classifier"

    def forward(self, input_ids, *, context_ids=None, mask=None, context_mask=None) -> torch.Tensor:
        self._check_inputs(input_ids, context_ids, mask, context_mask)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, mask=mask)
        h = self.norm(x)  # (B, T, d)
        if mask is None:
            pooled = h.mean(dim=1)
        else:
            w = mask.to(h.dtype)[..., None]
            pooled = (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        return self.head(pooled)  # (B, num_classes)


class EncoderDecoder(SequenceModel):
    """Encoder (noncausal self, ``encoder`` + ``encoder_norm``) over ``context_ids [B, S]``; decoder
    blocks (causal self, noncausal cross over the encoder output, MLP) over ``input_ids [B, T]``
    -> ``[B, T, vocab]``. Source and target share the embedding."""

    kind = "encoder_decoder"
    uses_context = True

    def __init__(self, *, encoder: nn.ModuleList, **kw):
        super().__init__(**kw)
        self.encoder = encoder
        self.encoder_norm = nn.RMSNorm(self.d_model)

    def encode(self, context_ids: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``context_ids [B, S]`` -> memory ``[B, S, d]`` that every decoder block reads."""
        x = self.embed(context_ids)
        for block in self.encoder:
            x = block(x, mask=context_mask)
        return self.encoder_norm(x)

    def forward(self, input_ids, *, context_ids=None, mask=None, context_mask=None) -> torch.Tensor:
        self._check_inputs(input_ids, context_ids, mask, context_mask)
        memory = self.encode(context_ids, context_mask)
        return self._decode(self.embed(input_ids), mask, memory, context_mask)  # (B, T, vocab)


class AlignedTransducer(SequenceModel):
    """Streaming transducer: blocks of causal self over ``input_ids [B, T]`` and causal cross over
    the embedded ``context_ids [B, T]`` (aligned: output i sees context positions ``<= i``)
    -> ``[B, T, vocab]``. Input and context share the embedding."""

    kind = "aligned_transducer"
    uses_context = True

    def forward(self, input_ids, *, context_ids=None, mask=None, context_mask=None) -> torch.Tensor:
        self._check_inputs(input_ids, context_ids, mask, context_mask)
        if context_ids.shape[1] != input_ids.shape[1]:
            raise ValueError(
                f"aligned_transducer needs context_ids as long as input_ids, got {context_ids.shape[1]} and {input_ids.shape[1]}"
            )
        return self._decode(self.embed(input_ids), mask, self.embed(context_ids), context_mask)  # (B, T, vocab)


# -- builders --------------------------------------------------------------------------------
def _check_dims(vocab_size: int, d_model: int, max_len: int | None) -> None:
    for name, value in (("vocab_size", vocab_size), ("d_model", d_model)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")


def decoder_lm(
    *,
    vocab_size: int,
    d_model: int,
    n_layers: int,
    mixer: str | list[str],
    n_heads: int = 4,
    num_classes: int | None = None,
    mixer_options: dict | None = None,
    max_len: int | None = None,
) -> DecoderLM:
    """A causal language model (see the module docstring); ``num_classes`` must be None."""
    _check_dims(vocab_size, d_model, max_len)
    if num_classes is not None:
        raise ValueError("decoder_lm predicts tokens; num_classes must be None")
    names = layer_mixers(mixer, n_layers)
    blocks = _blocks("decoder_lm", "", names, causal=True, cross=None, d_model=d_model, n_heads=n_heads, mixer_options=mixer_options, max_len=max_len)
    return DecoderLM(vocab_size=vocab_size, d_model=d_model, blocks=blocks, out_features=vocab_size, max_len=max_len)


def encoder_classifier(
    *,
    vocab_size: int,
    d_model: int,
    n_layers: int,
    mixer: str | list[str],
    n_heads: int = 4,
    num_classes: int | None = None,
    mixer_options: dict | None = None,
    max_len: int | None = None,
) -> EncoderClassifier:
    """A noncausal encoder with a mean-pool classifier head over ``num_classes`` (required)."""
    _check_dims(vocab_size, d_model, max_len)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"encoder_classifier needs num_classes, an int >= 2; got {num_classes!r}")
    names = layer_mixers(mixer, n_layers)
    blocks = _blocks(
        "encoder_classifier", "", names, causal=False, cross=None, d_model=d_model, n_heads=n_heads, mixer_options=mixer_options, max_len=max_len
    )
    return EncoderClassifier(vocab_size=vocab_size, d_model=d_model, blocks=blocks, out_features=num_classes, max_len=max_len)


def encoder_decoder(
    *,
    vocab_size: int,
    d_model: int,
    n_layers: int,
    mixer: str | list[str],
    n_heads: int = 4,
    num_classes: int | None = None,
    mixer_options: dict | None = None,
    max_len: int | None = None,
) -> EncoderDecoder:
    """An encoder-decoder with ``n_layers`` encoder blocks and ``n_layers`` decoder blocks; layer i of
    both uses ``mixer[i]`` (self and cross). ``num_classes`` must be None."""
    _check_dims(vocab_size, d_model, max_len)
    if num_classes is not None:
        raise ValueError("encoder_decoder predicts tokens; num_classes must be None")
    names = layer_mixers(mixer, n_layers)
    build = dict(d_model=d_model, n_heads=n_heads, mixer_options=mixer_options, max_len=max_len)
    encoder = _blocks("encoder_decoder", "encoder ", names, causal=False, cross=None, **build)
    blocks = _blocks("encoder_decoder", "decoder ", names, causal=True, cross=Pattern.NONCAUSAL_CROSS, **build)
    return EncoderDecoder(vocab_size=vocab_size, d_model=d_model, blocks=blocks, encoder=encoder, out_features=vocab_size, max_len=max_len)


def aligned_transducer(
    *,
    vocab_size: int,
    d_model: int,
    n_layers: int,
    mixer: str | list[str],
    n_heads: int = 4,
    num_classes: int | None = None,
    mixer_options: dict | None = None,
    max_len: int | None = None,
) -> AlignedTransducer:
    """A streaming transducer: per block causal self and causal cross (same mixer). ``num_classes`` must be None."""
    _check_dims(vocab_size, d_model, max_len)
    if num_classes is not None:
        raise ValueError("aligned_transducer predicts tokens; num_classes must be None")
    names = layer_mixers(mixer, n_layers)
    blocks = _blocks(
        "aligned_transducer", "", names, causal=True, cross=Pattern.CAUSAL_CROSS, d_model=d_model, n_heads=n_heads, mixer_options=mixer_options, max_len=max_len
    )
    return AlignedTransducer(vocab_size=vocab_size, d_model=d_model, blocks=blocks, out_features=vocab_size, max_len=max_len)


_BUILDERS = {
    "encoder_classifier": encoder_classifier,
    "decoder_lm": decoder_lm,
    "encoder_decoder": encoder_decoder,
    "aligned_transducer": aligned_transducer,
}


def build_model(
    kind: str,
    *,
    vocab_size: int,
    d_model: int,
    n_layers: int,
    mixer: str | list[str],
    n_heads: int = 4,
    num_classes: int | None = None,
    mixer_options: dict | None = None,
    max_len: int | None = None,
) -> SequenceModel:
    """Builds a model of ``kind`` (one of ``MODEL_KINDS``); unknown kinds fail listing the kinds.

    ``max_len``: the longest input (and context) the model accepts, checked in ``forward``; it is
    also passed to mixers that take a ``max_len`` option.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; kinds: {', '.join(MODEL_KINDS)}")
    return _BUILDERS[kind](
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        mixer=mixer,
        n_heads=n_heads,
        num_classes=num_classes,
        mixer_options=mixer_options,
        max_len=max_len,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (elements) of ``model``, each shared parameter counted once."""
    return sum(p.numel() for p in model.parameters())
