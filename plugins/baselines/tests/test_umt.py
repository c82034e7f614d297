"""UMT aligner: shapes, visual gate, ESD conversion and loss, missing images, gradients.

Tiny models throughout (text: hidden 32, 2 layers, random weights; visual: a stand-in patch
encoder defined here), so each test runs on the CPU in about a second and never touches the
network.
"""

from __future__ import annotations

import pytest
import torch
from mner_bench_baselines.umt import (
    UmtAligner,
    UmtAlignerConfig,
    UmtCrossAttention,
    UmtSpanDetector,
)
from torch import nn

from mner_bench.config import resolve_config
from mner_bench.data import parse_conll
from mner_bench.decoders import CrfDecoder
from mner_bench.encoders import HfTextEncoder, HfTextEncoderConfig
from mner_bench.errors import ConfigError
from mner_bench.images import FixedImageProvider
from mner_bench.labels import TAGS, encode_tags
from mner_bench.model import Batch, MnerModel, VisualEncoder, collate_text, gather_words
from mner_bench.registry import get_registry
from mner_bench.training import build_model

CONLL = """IMGID:1
RT\tO
George\tB-PER
Zimmerman\tI-PER
in\tO
Florida\tB-LOC

IMGID:2
Apple\tB-ORG
launches\tO
iPhone\tB-OTHER
today\tO

IMGID:3
Obama\tB-PER
visits\tO
New\tB-LOC
York\tI-LOC
"""

TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
IMAGE_SIZE = 16


class TinyVisual(VisualEncoder):
    """Stand-in visual encoder: 8x8 patches of a 16x16 image -> ``[B, 4, 16]`` tokens."""

    hidden_size = 16
    image_size = IMAGE_SIZE
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)

    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(3, self.hidden_size, kernel_size=8, stride=8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.patches(images).flatten(2).transpose(1, 2)


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return HfTextEncoder(HfTextEncoderConfig(random_init=True, overrides=TINY_TEXT))


def build(text_encoder, **cfg) -> MnerModel:
    torch.manual_seed(0)
    visual = TinyVisual()
    aligner = UmtAligner(UmtAlignerConfig(**cfg), text_encoder, visual)
    decoder = CrfDecoder(aligner.output_size, len(TAGS))
    return MnerModel(text_encoder, aligner, decoder, visual).eval()


def make_batch(text_encoder, image_mask=(True, True, True), seed=1, with_images=True) -> Batch:
    tweets = parse_conll(CONLL)
    text = collate_text([text_encoder.encode_words(t.tokens, 64) for t in tweets], text_encoder.tokenizer.pad_token_id)
    tags = torch.zeros(text.word_starts.shape, dtype=torch.long)
    for b, t in enumerate(tweets):
        tags[b, : len(t.tags)] = torch.tensor(encode_tags(t.tags))
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(tweets), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) if with_images else None
    mask = torch.tensor(image_mask) if with_images else None
    return Batch([t.imgid for t in tweets], text, tags, images, mask)


def hidden_and_emissions(model: MnerModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.aligner(batch, model.text_encoder, model.visual_encoder)
        emissions, _ = model._emissions(batch)
    return out.hidden, emissions


# --------------------------------------------------------------------------- shapes and gate


def test_shapes_of_every_stage(text_encoder):
    model = build(text_encoder)
    batch = make_batch(text_encoder)
    B, L = batch.text.input_ids.shape
    W = batch.text.word_starts.size(1)
    c = text_encoder(batch.text)
    pad = batch.text.attention_mask == 0
    visual, valid = model.aligner.visual_tokens(batch, model.visual_encoder)
    assert visual.shape == (B, 4, 16) and valid.tolist() == [[True] * 4] * 3
    inter = model.aligner.interact(model.aligner.main_layer(c, c, pad), pad, visual, valid)
    assert inter.image_aware.shape == inter.visual_aware.shape == inter.gate.shape == (B, L, 32)
    assert inter.word_aware_visual.shape == (B, 4, 32)
    assert inter.fused.shape == (B, L, 64) and model.aligner.output_size == 64
    hidden, emissions = hidden_and_emissions(model, batch)
    assert hidden.shape == (B, L, 64)
    assert emissions.shape == (B, W, len(TAGS))
    pred = model.predict(batch)
    assert [len(p) for p in pred] == [5, 4, 4]


def test_gate_is_in_the_unit_interval_and_gates_a(text_encoder):
    model = build(text_encoder)
    batch = make_batch(text_encoder)
    c = text_encoder(batch.text).detach() * 50  # large inputs: the gate must still stay in [0, 1]
    pad = batch.text.attention_mask == 0
    visual, valid = model.aligner.visual_tokens(batch, model.visual_encoder)
    with torch.no_grad():
        inter = model.aligner.interact(c, pad, visual, valid)
    g = inter.gate
    assert float(g.min()) >= 0.0 and float(g.max()) <= 1.0
    assert float(g.std()) > 0.01  # element-wise, not a constant
    torch.testing.assert_close(inter.fused[..., :32], inter.visual_aware)
    torch.testing.assert_close(inter.fused[..., 32:], g * inter.image_aware)


# --------------------------------------------------------------------------- ESD branch


def test_conversion_matrix_spreads_b_and_i_evenly_over_the_types():
    esd = UmtSpanDetector(8)
    conv = esd.conversion
    assert conv.shape == (3, len(TAGS))
    for y, tag in enumerate(TAGS):
        want = [0.0, 0.0, 0.0]
        if tag == "O":
            want[0] = 1.0
        else:
            want["OBI".index(tag[0])] = 0.25  # 4 types: PER, LOC, ORG, MISC
        assert conv[:, y].tolist() == want, tag
    scores = torch.tensor([[[2.0, 4.0, -8.0]]])  # O, B, I
    typed = esd.convert(scores)[0, 0]
    assert typed[TAGS.index("O")] == 2.0
    assert all(typed[TAGS.index(f"B-{t}")] == 1.0 for t in ("PER", "LOC", "ORG", "MISC"))
    assert all(typed[TAGS.index(f"I-{t}")] == -2.0 for t in ("PER", "LOC", "ORG", "MISC"))
    ids = torch.tensor([[TAGS.index(t) for t in ("O", "B-PER", "I-PER", "B-MISC", "I-LOC")]])
    assert esd.span_tags(ids).tolist() == [[0, 1, 2, 1, 2]]


def test_loss_is_main_crf_plus_half_esd_crf_on_mixed_scores(text_encoder):
    model = build(text_encoder)
    batch = make_batch(text_encoder)
    aligner = model.aligner
    with torch.no_grad():
        out = model(batch)  # eval mode: no dropout, so the recomputation below is exact
        # Recompute by hand from the parts.
        c = text_encoder(batch.text)
        pad = batch.text.attention_mask == 0
        visual, valid = aligner.visual_tokens(batch, model.visual_encoder)
        inter = aligner.interact(aligner.main_layer(c, c, pad), pad, visual, valid)
        main = model.decoder.proj(gather_words(inter.fused, batch.text.word_starts))
        esd = aligner.esd.proj(gather_words(aligner.esd_layer(c, c, pad), batch.text.word_starts))
        final = 0.5 * main + 0.5 * esd @ aligner.esd.conversion
        mask = batch.text.word_mask
        main_nll = -model.decoder.crf(final, batch.tags, mask=mask, reduction="mean")
        esd_nll = -aligner.esd.crf(esd, aligner.esd.span_tags(batch.tags), mask=mask, reduction="mean")
    torch.testing.assert_close(out.loss, main_nll + 0.5 * esd_nll)
    assert out.parts["loss_decoder"] == pytest.approx(float(main_nll), rel=1e-5)
    assert out.parts["loss_esd"] == pytest.approx(0.5 * float(esd_nll), rel=1e-5)
    assert model.predict(batch) == model.decoder.crf.decode(final, mask=mask)
    assert 0.0 < out.parts["umt_gate_mean"] < 1.0


# --------------------------------------------------------------------------- missing images


def test_cross_attention_with_no_keys_is_finite_and_reduces_to_the_residual_path():
    torch.manual_seed(0)
    layer = UmtCrossAttention(8, 2, 16, dropout=0.0).eval()
    # A trained layer's output bias is not zero; "no attention" must drop it too. (Depending on
    # torch's attention backend, keys that are all masked give NaN or zeros before this bias.)
    nn.init.normal_(layer.attention.out_proj.bias)
    x, y = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    padding = torch.tensor([[False] * 5, [True] * 5])
    out = layer(x, y, padding)
    assert torch.isfinite(out).all()
    p = layer.norm1(x[1])
    torch.testing.assert_close(out[1], layer.norm2(p + layer.ffn(p)))
    torch.testing.assert_close(out[0], layer(x[:1], y[:1], padding[:1])[0])  # the other tweet is untouched


def test_masked_image_gives_finite_output_independent_of_its_pixels(text_encoder):
    model = build(text_encoder)
    batch = make_batch(text_encoder, image_mask=(True, False, True))
    hidden, emissions = hidden_and_emissions(model, batch)
    assert torch.isfinite(hidden).all() and torch.isfinite(emissions).all()

    other = make_batch(text_encoder, image_mask=(True, False, True), seed=2)  # new pixels for every tweet
    other.images[0] = batch.images[0]
    other.images[2] = batch.images[2]
    hidden2, emissions2 = hidden_and_emissions(model, other)
    assert torch.equal(hidden2, hidden) and torch.equal(emissions2, emissions)

    # Sanity: a *valid* image does change its tweet's output.
    other.images[0] = -batch.images[0]
    hidden3, _ = hidden_and_emissions(model, other)
    assert not torch.allclose(hidden3[0], hidden[0])
    torch.testing.assert_close(hidden3[1:], hidden[1:])

    # No valid image at all, or no images in the batch: same finite, text-only result.
    none_valid = make_batch(text_encoder, image_mask=(False, False, False))
    no_images = make_batch(text_encoder, with_images=False)
    h_none, e_none = hidden_and_emissions(model, none_valid)
    h_absent, e_absent = hidden_and_emissions(model, no_images)
    assert torch.isfinite(e_none).all()
    torch.testing.assert_close(h_none, h_absent)
    torch.testing.assert_close(h_none[1], hidden[1])

    model.train()
    loss = model(batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_empty_image_protocol_differs_from_masking(text_encoder):
    masked = build(text_encoder, missing_image="mask")
    empty = build(text_encoder, missing_image="empty")
    empty.load_state_dict(masked.state_dict())
    batch = make_batch(text_encoder, image_mask=(True, False, True))
    h_mask, _ = hidden_and_emissions(masked, batch)
    h_empty, _ = hidden_and_emissions(empty, batch)
    assert not torch.allclose(h_empty[1], h_mask[1], atol=1e-3)  # the missing image's tweet
    torch.testing.assert_close(h_empty[[0, 2]], h_mask[[0, 2]])  # tweets with images: identical
    # The uniform image replaces the pixels, so the output does not depend on them either.
    other = make_batch(text_encoder, image_mask=(True, False, True))
    other.images[1] = torch.rand_like(other.images[1])
    h_other, _ = hidden_and_emissions(empty, other)
    torch.testing.assert_close(h_other, h_empty)
    # ... and it is the core's "uniform empty image" (test_f1_empty_image) given as a valid image.
    grey = FixedImageProvider(IMAGE_SIZE, TinyVisual.mean, TinyVisual.std, "empty")(parse_conll(CONLL)[:1])[0][0]
    explicit = make_batch(text_encoder, image_mask=(True, True, True))
    explicit.images[1] = grey
    h_explicit, _ = hidden_and_emissions(masked, explicit)
    torch.testing.assert_close(h_explicit[1], h_empty[1])


@pytest.mark.parametrize("visual", ["clip-vit-b32", "resnet152"])
def test_umt_runs_on_every_registered_visual_encoder(visual, text_encoder):
    """Through the registry, tiny: batch-norm in training mode must not leak a missing image."""
    reg = get_registry()
    cfg = resolve_config(reg, "umt", None, [
        "text_encoder.random_init=true", *(f"text_encoder.overrides.{k}={v}" for k, v in TINY_TEXT.items()),
        f"visual_encoder.type={visual}", "visual_encoder.tiny=true",
    ])
    torch.manual_seed(0)
    model = build_model(cfg, reg).train()
    size = model.visual_encoder.image_size
    batch = make_batch(model.text_encoder, image_mask=(True, False, True))
    batch.images = torch.randn(3, 3, size, size)
    out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert float(model.aligner.v1.weight.grad.abs().sum()) > 0
    torch.manual_seed(1)
    h1 = model.aligner(batch, model.text_encoder, model.visual_encoder).hidden
    batch.images[1] = torch.randn(3, size, size) * 5
    torch.manual_seed(1)
    h2 = model.aligner(batch, model.text_encoder, model.visual_encoder).hidden
    torch.testing.assert_close(h1, h2)  # same dropout masks, new pixels of the missing image


# --------------------------------------------------------------------------- training


def test_gradients_reach_v1_v2_gate_and_the_esd_head(text_encoder):
    model = build(text_encoder).train()
    batch = make_batch(text_encoder, image_mask=(True, False, True))
    model(batch).loss.backward()
    a = model.aligner
    for name, param in [("v1", a.v1.weight), ("v2", a.v2.weight), ("gate", a.gate.weight),
                        ("esd.proj", a.esd.proj.weight), ("esd.crf", a.esd.crf.transitions),
                        ("visual encoder", model.visual_encoder.patches.weight),
                        ("decoder", model.decoder.proj.weight)]:
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name


def test_bad_configs_fail_with_the_key(text_encoder):
    with pytest.raises(ConfigError, match="aligner.missing_image"):
        UmtAligner(UmtAlignerConfig(missing_image="blank"), text_encoder, TinyVisual())
    with pytest.raises(ConfigError, match="visual encoder"):
        UmtAligner(UmtAlignerConfig(), text_encoder, None)
    with pytest.raises(ConfigError, match="aligner.num_heads"):
        UmtAligner(UmtAlignerConfig(num_heads=3), text_encoder, TinyVisual())


def test_object_crops_add_visual_tokens_and_empty_slots_change_nothing(text_encoder):
    """Crops are encoded like the image and their tokens appended (masked where a slot is
    empty): a tweet without crops gets exactly the output it gets without any crops in the
    batch; a tweet with a crop gets a different one."""
    model = build(text_encoder)
    batch = make_batch(text_encoder)
    hidden, _ = hidden_and_emissions(model, batch)
    g = torch.Generator().manual_seed(5)
    batch.crops = torch.randn(3, 2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    batch.crop_mask = torch.tensor([[True, False], [False, False], [True, True]])
    visual, valid = model.aligner.visual_tokens(batch, model.visual_encoder)
    assert visual.shape == (3, 4 * 3, 16)
    assert valid.tolist()[1] == [True] * 4 + [False] * 8 and valid.tolist()[0] == [True] * 8 + [False] * 4
    assert visual[1, 4:].abs().sum() == 0  # empty slots are never encoded
    with_crops, _ = hidden_and_emissions(model, batch)
    torch.testing.assert_close(with_crops[1], hidden[1])
    assert not torch.allclose(with_crops[0], hidden[0]) and not torch.allclose(with_crops[2], hidden[2])
    # crops alone (no valid image) still reach the model
    batch.image_mask = torch.tensor([False, False, False])
    visual, valid = model.aligner.visual_tokens(batch, model.visual_encoder)
    assert valid[0, :4].any().item() is False and valid[0, 4:8].all().item() is True
