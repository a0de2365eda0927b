"""Model builders: shapes, hybrids, parameter counts, pattern checks, causality, padding, training."""

import pytest
import torch

import seqmix
from seqmix.models import MODEL_KINDS, build_model, count_parameters, decoder_lm
from seqmix.models.layers import SwiGLU

V, D, L, HEADS, B, T, S, CLASSES = 11, 16, 2, 2, 3, 9, 6, 4
REF = {"backend": "reference"}  # plain-PyTorch paths everywhere (CPU, float64)


def build(kind: str, mixer="softmax", **kw):
    torch.manual_seed(0)
    num_classes = CLASSES if kind == "encoder_classifier" else None
    options = kw.pop("mixer_options", REF)
    return build_model(
        kind, vocab_size=V, d_model=D, n_layers=L, mixer=mixer, n_heads=HEADS, num_classes=num_classes, mixer_options=options, **kw
    ).double()


def inputs(kind: str, batch: int = B, t: int = T):
    ids = torch.randint(V, (batch, t))
    context = None
    if kind == "encoder_decoder":
        context = torch.randint(V, (batch, S))
    elif kind == "aligned_transducer":
        context = torch.randint(V, (batch, t))
    return ids, context


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("mixer", ["softmax", ["softmax", "linear"]], ids=["softmax", "hybrid"])
def test_output_shapes(kind, mixer):
    model = build(kind, mixer)
    ids, context = inputs(kind)
    logits = model(ids, context_ids=context)
    expected = (B, CLASSES) if kind == "encoder_classifier" else (B, T, V)
    assert logits.shape == expected and logits.dtype == torch.float64
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_builders_by_name_match_build_model(kind):
    builder = getattr(seqmix.models, kind)
    num_classes = CLASSES if kind == "encoder_classifier" else None
    torch.manual_seed(0)
    a = builder(vocab_size=V, d_model=D, n_layers=L, mixer="softmax", n_heads=HEADS, num_classes=num_classes)
    b = build(kind).float()
    assert type(a) is type(b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_hybrid_layers_hold_the_named_mixers():
    model = build("encoder_decoder", ["linear", "softmax"])
    assert [b.mixer.name for b in model.blocks] == ["linear", "softmax"]
    assert [b.cross.name for b in model.blocks] == ["linear", "softmax"]
    assert [b.mixer.name for b in model.encoder] == ["linear", "softmax"]
    assert all(b.cross is None for b in model.encoder)
    transducer = build("aligned_transducer", ["hyena", "softmax"])
    assert [(b.mixer.name, b.cross.name, b.causal, b.cross_causal) for b in transducer.blocks] == [
        ("hyena", "hyena", True, True),
        ("softmax", "softmax", True, True),
    ]


def test_mixer_list_must_match_layers():
    with pytest.raises(ValueError, match="one per layer"):
        build("decoder_lm", ["softmax"] * 3)
    with pytest.raises(TypeError, match="mixer"):
        build("decoder_lm", 3)


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ValueError, match="decoder_lm.*aligned_transducer"):
        build_model("gpt", vocab_size=V, d_model=D, n_layers=L, mixer="softmax")


def test_num_classes_rules():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("encoder_classifier", vocab_size=V, d_model=D, n_layers=L, mixer="softmax")
    with pytest.raises(ValueError, match="num_classes"):
        decoder_lm(vocab_size=V, d_model=D, n_layers=L, mixer="softmax", num_classes=3)


@pytest.mark.parametrize(
    "kind,mixer,where",
    [
        ("encoder_decoder", "hyena", "decoder layer 0 \\(cross\\)"),
        ("encoder_decoder", ["softmax", "s4d"], "decoder layer 1 \\(cross\\)"),
        ("aligned_transducer", ["softmax", "s4d"], None),
    ],
)
def test_mixer_without_the_needed_pattern_fails_at_build(kind, mixer, where):
    if where is None:  # s4d serves causal self and causal cross: this one builds
        build(kind, mixer, mixer_options=None)
        return
    with pytest.raises(ValueError, match=f"{where}.*does not serve the noncausal_cross pattern"):
        build(kind, mixer, mixer_options=None)


def test_mixer_options_shared_and_per_mixer():
    model = build("decoder_lm", ["local", "softmax"], mixer_options={"backend": "reference", "local": {"window": 3}})
    assert model.blocks[0].mixer.window == 3 and model.blocks[1].mixer.window is None
    assert model.blocks[0].mixer.backend == model.blocks[1].mixer.backend == "reference"
    with pytest.raises(TypeError, match="window"):
        build("decoder_lm", ["local", "hyena"], mixer_options={"window": 3})
    with pytest.raises(TypeError, match="names a mixer"):
        build("decoder_lm", "local", mixer_options={"local": 3})


def test_parameter_counts():
    d, hidden, v = D, 48, V  # SwiGLU hidden: 8/3 * 16 = 42.7 -> 48 (a multiple of 8)
    assert SwiGLU(d).down.in_features == hidden
    mlp = 3 * d * hidden
    norms = 2 * d
    softmax = 4 * d * d  # q, k, v, o projections, no biases
    embed_head_norm = 2 * v * d + d
    assert count_parameters(build("decoder_lm")) == embed_head_norm + L * (softmax + mlp + norms)
    assert count_parameters(build("encoder_classifier")) == v * d + d + CLASSES * d + L * (softmax + mlp + norms)
    cross_block = 2 * softmax + mlp + 3 * d
    assert count_parameters(build("aligned_transducer")) == embed_head_norm + L * cross_block
    assert count_parameters(build("encoder_decoder")) == embed_head_norm + d + L * (softmax + mlp + norms) + L * cross_block


def test_decoder_lm_logits_at_selects_positions():
    model = build("decoder_lm")
    ids, _ = inputs("decoder_lm")
    at = torch.rand(B, T) < 0.3
    at[0, 0] = True
    full = model(ids)
    torch.testing.assert_close(model(ids, logits_at=at), full[at], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="logits_at must be a bool tensor of shape"):
        model(ids, logits_at=at[:, :2])


@pytest.mark.parametrize("mixer", ["softmax", "hyena", ["linear", "softmax"]], ids=["softmax", "hyena", "hybrid"])
def test_decoder_lm_is_causal(mixer):
    model = build("decoder_lm", mixer)
    ids, _ = inputs("decoder_lm")
    changed = ids.clone()
    changed[:, 5:] = torch.randint(V, (B, T - 5))
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-12)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-6


@pytest.mark.parametrize("mixer", ["softmax", "hyena", ["linear", "softmax"]], ids=["softmax", "hyena", "hybrid"])
def test_aligned_transducer_is_causal_in_input_and_context(mixer):
    model = build("aligned_transducer", mixer)
    ids, context = inputs("aligned_transducer")
    base = model(ids, context_ids=context)
    for which in ("input", "context"):
        new_ids, new_context = ids.clone(), context.clone()
        target = new_ids if which == "input" else new_context
        target[:, 5:] = (target[:, 5:] + 1 + torch.randint(V - 1, (B, T - 5))) % V  # every future token changes
        out = model(new_ids, context_ids=new_context)
        torch.testing.assert_close(out[:, :5], base[:, :5], rtol=0, atol=1e-12)
        assert (out[:, 5:] - base[:, 5:]).abs().max() > 1e-6, which


def test_encoder_decoder_sees_the_whole_context():
    model = build("encoder_decoder")
    ids, context = inputs("encoder_decoder")
    changed = context.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    assert (model(ids, context_ids=context)[:, 0] - model(ids, context_ids=changed)[:, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("mixer", ["softmax", "hyena", ["linear", "softmax"]], ids=["softmax", "hyena", "hybrid"])
def test_encoder_classifier_ignores_padding(mixer):
    model = build("encoder_classifier", mixer)
    lengths = torch.tensor([T, 5, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ids, _ = inputs("encoder_classifier")
    other = torch.where(mask, ids, torch.randint(V, (B, T)))
    a, b = model(ids, mask=mask), model(other, mask=mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # and equal to running each sequence alone, unpadded
    for i, n in enumerate(lengths.tolist()):
        alone = model(ids[i : i + 1, :n])
        torch.testing.assert_close(a[i : i + 1], alone, rtol=1e-10, atol=1e-12)


def test_encoder_decoder_ignores_context_padding():
    model = build("encoder_decoder")
    ids, context = inputs("encoder_decoder")
    context_mask = torch.ones(B, S, dtype=torch.bool)
    context_mask[1, 4:] = False
    other = context.clone()
    other[1, 4:] = (other[1, 4:] + 1) % V
    a = model(ids, context_ids=context, context_mask=context_mask)
    b = model(ids, context_ids=other, context_mask=context_mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    alone = model(ids[1:2], context_ids=context[1:2, :4])
    torch.testing.assert_close(a[1:2], alone, rtol=1e-10, atol=1e-12)


def test_forward_input_checks():
    lm = build("decoder_lm", max_len=T)
    ids, _ = inputs("decoder_lm")
    with pytest.raises(TypeError, match="input_ids"):
        lm(ids.int())
    with pytest.raises(ValueError, match="max_len"):
        lm(torch.randint(V, (B, T + 1)))
    with pytest.raises(ValueError, match="mask"):
        lm(ids, mask=torch.ones(B, T))
    with pytest.raises(ValueError, match="takes no context"):
        lm(ids, context_ids=ids)
    ed = build("encoder_decoder")
    with pytest.raises(ValueError, match="needs context_ids"):
        ed(ids)
    at = build("aligned_transducer")
    with pytest.raises(ValueError, match="as long as"):
        at(ids, context_ids=ids[:, :4])


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_tiny_model_fits_one_batch(kind):
    model = build(kind).float()
    ids, context = inputs(kind, batch=4)
    target = torch.randint(CLASSES, (4,)) if kind == "encoder_classifier" else torch.randint(V, (4, T))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(ids, context_ids=context)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
