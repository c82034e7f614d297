"""BGA-MNER aligner: SCS masks and gradients, generators, losses, image-free inference,
ablation switches and parameter counts.

Tiny models throughout (text: hidden 32, 2 layers, random weights, MiniLM's tokenizer; visual:
the tiny CLIP ViT of ``mner_bench.visual``, width 32, 2 blocks, 32-pixel images, 17 tokens),
built once per module and deep-copied per test, so that each test runs in about a second on
the CPU and never touches the network.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from mner_bench_bga.model import (
    BgaAligner,
    BgaAlignerConfig,
    BgaContextSampler,
    BgaGenerator,
    bga_kl,
    map_layers,
    masked_attention,
    run_layer,
)

from mner_bench.builtin import TextOnlyAligner
from mner_bench.decoders import CrfDecoder
from mner_bench.encoders import HfTextEncoder, HfTextEncoderConfig
from mner_bench.errors import ConfigError
from mner_bench.labels import TAGS, encode_tags
from mner_bench.model import Batch, MnerModel

TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
WORDS = [["RT", "George", "Zimmerman", "in", "Florida"], ["Apple", "launches", "iPhone"], ["Obama", "visits", "New", "York"]]
TAGSEQ = [["O", "B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC"], ["B-PER", "O", "B-LOC", "I-LOC"]]


@pytest.fixture(scope="module")
def encoders():
    from mner_bench.visual import ClipVitConfig, ClipVitEncoder

    torch.manual_seed(0)
    text = HfTextEncoder(HfTextEncoderConfig(random_init=True, overrides=dict(TINY_TEXT)))
    visual = ClipVitEncoder(ClipVitConfig(tiny=True))
    return text, visual


@pytest.fixture
def make(encoders):
    """``make(**aligner_settings) -> MnerModel`` with fresh copies of the tiny encoders."""

    def build(**settings):
        settings.setdefault("mcg_ff", 64)  # generator FFN in proportion to the tiny width (default 2048)
        torch.manual_seed(0)
        text, visual = copy.deepcopy(encoders[0]), copy.deepcopy(encoders[1])
        aligner = BgaAligner(BgaAlignerConfig(**settings), text, visual)
        return MnerModel(text, aligner, CrfDecoder(aligner.output_size, len(TAGS)), visual)

    return build


def make_batch(model: MnerModel, images: bool = True, image_mask=(True, False, True)) -> Batch:
    text = model.text_encoder.tokenize(WORDS, 128)
    tags = torch.zeros(text.word_starts.shape, dtype=torch.long)
    for b, seq in enumerate(TAGSEQ):
        tags[b, : len(seq)] = torch.tensor(encode_tags(seq))
    if not images:
        return Batch(["1", "2", "3"], text, tags)
    g = torch.Generator().manual_seed(1)
    size = model.visual_encoder.image_size
    return Batch(["1", "2", "3"], text, tags, torch.randn(3, 3, size, size, generator=g), torch.tensor(image_mask))


def n_params(*modules) -> int:
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


# --------------------------------------------------------------------------- SCS (Eq. 1)


@pytest.mark.parametrize("training", [True, False])
def test_scs_masks_are_binary_keep_the_first_token_and_never_keep_padding(training):
    torch.manual_seed(0)
    scs = BgaContextSampler(16, init_keep=0.5).train(training)  # no keep bias: both values occur
    x = torch.randn(4, 9, 16) * 3
    valid = torch.ones(4, 9, dtype=torch.bool)
    valid[1, 5:] = False
    valid[3, 2:] = False
    m = scs(x, valid.float(), valid)
    assert m.shape == (4, 9)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert m[~valid].sum() == 0
    assert torch.all(m[:, 0] == 1)
    assert 0 < m[valid].sum() < valid.sum()
    if not training:  # argmax of p at eval: deterministic and equal to the logits' sign
        logits = scs.logits(x, valid.float())
        want = ((logits[..., 0] >= logits[..., 1]) & valid).float()
        want[:, 0] = 1
        assert torch.equal(m, want)
        assert torch.equal(scs(x, valid.float(), valid), m)


@pytest.mark.parametrize("keep", [0.9, 0.3])
def test_scs_starts_keeping_tokens_with_the_configured_probability(keep):
    """``scs_init_keep``: at initialisation each token is kept with about that probability in
    training, and at eval (argmax) a keep bias above 1/2 keeps every token: no layer starts blind."""
    torch.manual_seed(0)
    scs = BgaContextSampler(32, init_keep=keep)
    x = torch.randn(8, 200, 32)
    valid = torch.ones(8, 200, dtype=torch.bool)
    p = F.softmax(scs.logits(x, valid.float()), -1)[..., 0]
    assert p.mean().item() == pytest.approx(keep, abs=0.05)
    sampled = scs.train()(x, valid.float(), valid)[:, 1:].mean().item()
    assert sampled == pytest.approx(keep, abs=0.05)
    kept_at_eval = scs.eval()(x, valid.float(), valid)[:, 1:].mean().item()
    assert kept_at_eval == (1.0 if keep > 0.5 else pytest.approx(0.0, abs=0.05))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="aligner.scs_init_keep"):
            BgaContextSampler(8, init_keep=bad)


def test_scs_cumulative_masks_only_shrink():
    torch.manual_seed(0)
    scs = BgaContextSampler(16, cumulative=True).train()
    valid = torch.ones(2, 12, dtype=torch.bool)
    prev = torch.tensor([[1.0] * 6 + [0.0] * 6, [1.0, 0.0] * 6])
    m = scs(torch.randn(2, 12, 16), prev, valid)
    assert torch.all(m <= prev)


def test_scs_global_context_pools_only_tokens_kept_at_the_previous_stage():
    torch.manual_seed(0)
    scs = BgaContextSampler(8).eval()
    x = torch.randn(1, 5, 8)
    prev = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])
    changed = x.clone()
    changed[0, 2:] = 100.0  # tokens dropped at the previous stage: must not change g
    assert torch.allclose(scs.logits(x, prev)[0, :2], scs.logits(changed, prev)[0, :2])


def test_masks_from_the_aligner_are_binary_and_never_keep_padding(make):
    model = make()
    batch = make_batch(model)
    valid = batch.text.attention_mask.bool()
    assert (~valid).any()  # the batch has padding
    for training in (True, False):
        model.train(training)
        s = model.aligner.streams(batch, model.text_encoder, model.visual_encoder)
        for m in s.text_masks:
            assert set(m.unique().tolist()) <= {0.0, 1.0}
            assert m[~valid].sum() == 0
        for m in s.visual_masks:
            assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_gradients_reach_every_scs_mlp_through_the_gumbel_sample(make):
    model = make()
    batch = make_batch(model)
    model.train()
    model(batch).loss.backward()
    for name in ("text_scs", "visual_scs"):
        for mlp in ("mlp_a", "mlp_b", "mlp_c"):
            grads = [p.grad for p in getattr(getattr(model.aligner, name)[0], mlp).parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"{name}[0].{mlp}"


def test_the_straight_through_mask_is_what_carries_the_gradient():
    """Without the Gumbel straight-through path (a detached mask) the SCS gets no gradient."""
    torch.manual_seed(0)
    scs = BgaContextSampler(8).train()
    gen = BgaGenerator(8, 8, num_queries=3, head_dim=4, dropout=0.0)
    x = torch.randn(2, 6, 8)
    valid = torch.ones(2, 6, dtype=torch.bool)
    gen(x, scs(x, valid.float(), valid), 3).square().sum().backward()
    assert scs.mlp_c[0].weight.grad.abs().sum() > 0
    scs.zero_grad()
    gen(x, scs(x, valid.float(), valid).detach(), 3).square().sum().backward()
    assert scs.mlp_c[0].weight.grad is None or scs.mlp_c[0].weight.grad.abs().sum() == 0


# --------------------------------------------------------------------------- MCG (Eq. 2-3)


def test_masked_attention_equals_softmax_over_the_kept_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4) * 4, torch.randn(2, 2, 5, 4)
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0, 0.0]])
    got = masked_attention(q, k, v, keep)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep.bool()[:, None, None, :])
    assert torch.allclose(got, want, atol=1e-6)


def test_generator_ignores_dropped_source_tokens_and_cuts_text_queries():
    torch.manual_seed(0)
    gen = BgaGenerator(6, 10, num_queries=7, head_dim=5, dropout=0.0).eval()
    src = torch.randn(2, 4, 6)
    keep = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    out = gen(src, keep, 5)
    assert out.shape == (2, 5, 10)  # queries cut to n, target width
    changed = src.clone()
    changed[0, 2:] = 50.0
    changed[1, 1] = -50.0
    changed[1, 3] = 9.0
    assert torch.allclose(gen(changed, keep, 5), out, atol=1e-6)
    assert not torch.allclose(gen(src, torch.ones(2, 4), 5), out, atol=1e-4)
    with pytest.raises(ConfigError, match="text_queries"):
        gen(src, keep, 8)


# --------------------------------------------------------------------------- losses (Eq. 5-7, 11)


def test_generator_in_eval_runs_the_queries_once_per_batch_with_the_same_result():
    """In eval mode the first decoder layer's query self-attention and projection (which do not
    depend on the tweet) run on a batch of one and are broadcast; the output equals running them
    per tweet (training mode without dropout takes that path)."""
    torch.manual_seed(0)
    gen = BgaGenerator(16, 24, 10, layers=2, head_dim=8, dropout=0.0, ff=40)
    source = torch.randn(3, 7, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]).float()
    broadcast = gen.eval()(source, mask, 10)
    per_tweet = gen.train()(source, mask, 10)
    assert broadcast.shape == per_tweet.shape == (3, 10, 24)
    assert torch.allclose(broadcast, per_tweet, atol=1e-5)
    assert gen.layers[0].ff[0].out_features == 40


def test_generator_reuses_its_constant_query_part_only_while_the_weights_are_the_same():
    """Without autograd in eval mode the first layer's query part is kept between calls (G_t2v
    runs at every BGA layer and batch); changing a weight in place, as an optimizer step or
    ``load_state_dict`` does, recomputes it, so outputs always equal a fresh computation."""
    torch.manual_seed(0)
    gen = BgaGenerator(16, 24, 10, layers=1, head_dim=8, dropout=0.0, ff=40).eval()
    source, mask = torch.randn(2, 5, 16), torch.ones(2, 5)

    def fresh(n=10):
        with torch.enable_grad():  # the uncached path
            return gen(source, mask, n).detach()

    with torch.no_grad():
        first = gen(source, mask, 10)
        assert gen.__dict__["_constant_cache"] is not None
        calls = []
        gen.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
        again = gen(source, mask, 10)
        assert calls == [] and torch.equal(first, again)  # reused: self-attention did not run
        gen.queries.add_(0.5)  # in place, like an optimizer step
        changed = gen(source, mask, 10)
        assert calls == [1] and not torch.allclose(changed, first) and torch.allclose(changed, fresh(), atol=1e-6)
        gen.load_state_dict({k: v + 0.1 if k.endswith("w_q.weight") else v for k, v in gen.state_dict().items()})
        assert torch.allclose(gen(source, mask, 10), fresh(), atol=1e-6)
        assert torch.allclose(gen(source, mask, 4), fresh(4), atol=1e-6)  # fewer queries: another key
    assert "_constant_cache" not in gen.state_dict()


def test_kl_is_zero_for_equal_features_and_matches_a_hand_computation():
    real = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    gen = torch.tensor([[[0.0, math_log(3.0)], [5.0, 5.0]]])
    w = torch.tensor([[1.0, 0.0]])  # the second token does not count
    # token 0: p_gen = (1/4, 3/4), p_real = (1/2, 1/2)
    want = 0.25 * math_log(0.5) + 0.75 * math_log(1.5)
    assert torch.allclose(bga_kl(gen, real, w), torch.tensor([want]), atol=1e-6)
    assert torch.allclose(bga_kl(real, real, torch.ones(1, 2)), torch.zeros(1), atol=1e-7)
    # over tokens (per channel): channel 0 over token 0 only is a point mass on both sides
    assert torch.allclose(bga_kl(gen, real, w, "token"), torch.zeros(1), atol=1e-7)
    assert bga_kl(gen, real, torch.ones(1, 2), "token") > 0


@pytest.mark.parametrize("softmax", ["feature", "token"])
def test_kl_gradients_stay_finite_where_the_mask_drops_positions(softmax):
    """A dropped position (weight 0) adds nothing and must not turn the gradient into NaN
    (with -inf logits, 0 * (-inf - -inf) did, and the first step of a run failed)."""
    torch.manual_seed(0)
    gen = torch.randn(2, 5, 4, requires_grad=True)
    real = torch.randn(2, 5, 4)
    w = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    loss = bga_kl(gen, real, w, softmax)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(gen.grad).all()
    assert gen.grad[w == 0].abs().sum() == 0 and gen.grad[w == 1].abs().sum() > 0
    # equal to the KL of the kept positions alone
    keep = w[0].bool()
    assert torch.allclose(loss[0], bga_kl(gen[:1, keep], real[:1, keep], torch.ones(1, int(keep.sum())), softmax))


def math_log(x: float) -> float:
    import math

    return math.log(x)


def test_generation_loss_is_eq11_alpha_times_layer_mean_of_recon_plus_cycle(make):
    model = make(alpha=0.5)
    batch = make_batch(model)
    model.train()
    torch.manual_seed(3)
    out = model(batch)
    assert set(out.parts) == {"loss_decoder", "loss_bga", "loss_recon", "loss_cycle"}
    assert out.parts["loss_recon"] > 0 and out.parts["loss_cycle"] > 0
    assert out.parts["loss_bga"] == pytest.approx(0.5 * (out.parts["loss_recon"] + out.parts["loss_cycle"]), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.parts["loss_decoder"] + out.parts["loss_bga"], rel=1e-5)
    # the per-tweet terms of the tweet without a valid image are exactly zero; the mean is over
    # the two tweets with one and over the N layers
    torch.manual_seed(3)
    s = model.aligner.streams(batch, model.text_encoder, model.visual_encoder)
    assert len(s.recon) == model.aligner.num_bga_layers == 1
    assert s.recon[0][1] == 0 and s.cycle[0][1] == 0
    assert out.parts["loss_recon"] == pytest.approx(float(s.recon[0].detach().sum() / 2), rel=1e-5)


@pytest.mark.parametrize("how", ["no images", "no valid image"])
def test_generation_loss_is_exactly_zero_for_a_batch_without_images(make, how):
    model = make()
    batch = make_batch(model, images=how != "no images", image_mask=(False, False, False))
    model.train()
    calls = []
    model.visual_encoder.embed = lambda images: calls.append(1)  # must not be called
    out = model(batch)
    assert out.parts["loss_bga"] == 0.0
    assert "loss_recon" not in out.parts and "loss_cycle" not in out.parts
    assert calls == []
    out.loss.backward()  # the text stream still trains through G_t2v
    assert model.aligner.g_t2v.queries.grad.abs().sum() > 0


# --------------------------------------------------------------------------- inference


def test_eval_output_is_identical_with_and_without_images_and_runs_no_visual_module(make):
    model = make().eval()
    with_images = make_batch(model)
    without = make_batch(model, images=False)
    ran = []
    hooks = [m.register_forward_hook(lambda *a, name=name: ran.append(name))
             for name, m in [("visual_scs", model.aligner.visual_scs), ("g_v2t", model.aligner.g_v2t),
                             *[(f"block{i}", b) for i, b in enumerate(model.visual_encoder.blocks)]]
             for m in (m.modules() if name == "visual_scs" else [m])]
    embed = model.visual_encoder.embed
    model.visual_encoder.embed = lambda images: ran.append("embed") or embed(images)
    e1, _ = model._emissions(with_images)
    e2, _ = model._emissions(without)
    assert torch.equal(e1, e2)
    assert model.predict(with_images) == model.predict(without)
    assert ran == []
    for h in hooks:
        h.remove()


def test_evaluation_loads_no_images_unless_inference_visual_is_real(make):
    """The batcher asks the image provider for nothing when bga evaluates image-free, so that
    evaluation and prediction time never includes image loading; training still loads them."""
    from mner_bench.data import Tweet
    from mner_bench.training import Batcher, EncodedSplit, predict_split

    class CountingProvider:
        calls = 0

        def __call__(self, tweets):
            CountingProvider.calls += 1
            size = model.visual_encoder.image_size
            return torch.zeros(len(tweets), 3, size, size), torch.ones(len(tweets), dtype=torch.bool)

    tweets = [Tweet(str(i), w, t) for i, (w, t) in enumerate(zip(WORDS, TAGSEQ, strict=True))]
    for setting, expect_calls in (("generated", 0), ("real", 2)):
        model = make(inference_visual=setting)
        split = EncodedSplit(tweets, [model.text_encoder.encode_words(t.tokens, 128) for t in tweets])
        batcher = Batcher(model.text_encoder.tokenizer.pad_token_id, CountingProvider())
        CountingProvider.calls = 0
        predict_split(model, batcher, split, 2, torch.device("cpu"), None)
        assert CountingProvider.calls == expect_calls, setting
        assert model.aligner.needs_images(training=True)


def test_inference_visual_real_uses_the_images(make):
    model = make(inference_visual="real").eval()
    e_real, _ = model._emissions(make_batch(model))
    e_gen, _ = model._emissions(make_batch(model, images=False))
    # tweet 2 has no valid image: it falls back to generated features; the others change
    assert torch.allclose(e_real[1], e_gen[1], atol=1e-6)
    assert not torch.allclose(e_real[0], e_gen[0], atol=1e-4)


def test_params_inference_excludes_the_visual_branch(make):
    model = make()
    a = model.aligner
    c = model.parameter_counts()
    assert c["params_inference"] < c["params_total"]
    visual_only = n_params(model.visual_encoder, a.visual_scs, a.g_v2t, a.visual_extractors)
    assert c["params_total"] - c["params_inference"] == visual_only
    assert c["params_inference"] == n_params(model.text_encoder, a.text_scs, a.g_t2v, a.text_extractors, model.decoder)
    real = make(inference_visual="real").parameter_counts()
    assert real["params_inference"] == c["params_inference"] + n_params(model.visual_encoder, a.visual_extractors)


# --------------------------------------------------------------------------- ablations (Table 3)


def test_scs_false_has_no_samplers_and_all_ones_masks(make):
    model = make(scs=False)
    assert not hasattr(model.aligner, "text_scs") and not hasattr(model.aligner, "visual_scs")
    assert not any("scs" in n for n, _ in model.named_parameters())
    batch = make_batch(model)
    model.train()
    s = model.aligner.streams(batch, model.text_encoder, model.visual_encoder)
    assert torch.equal(s.text_masks[0], batch.text.attention_mask.float())
    assert torch.equal(s.visual_masks[0], torch.ones_like(s.visual_masks[0]))
    full = make().parameter_counts()["params_total"]
    a = make().aligner
    assert model.parameter_counts()["params_total"] == full - n_params(a.text_scs, a.visual_scs)


def test_cycle_false_has_no_cycle_loss(make):
    model = make(cycle=False, alpha=1.0).train()
    out = model(make_batch(model))
    assert "loss_cycle" not in out.parts
    assert out.parts["loss_bga"] == pytest.approx(out.parts["loss_recon"], rel=1e-6)


@pytest.mark.parametrize("cycle_grad", ["both", "first"])
def test_cycle_grad_first_trains_only_the_generator_that_made_the_intermediate(make, cycle_grad):
    """V_bar = G_t2v(T_hat) and T_bar = G_v2t(V_hat) on intermediate features given as leaves:
    the generators appear only as the second of each cycle, so with ``first`` no cycle gradient
    reaches their weights, while the intermediate features get it either way."""
    from mner_bench_bga.model import BgaStreams

    model = make(cycle_grad=cycle_grad, alpha=1.0).train()
    al = model.aligner
    B, L, nv = 2, 5, al.g_t2v.num_queries
    dt, dv = model.text_encoder.hidden_size, model.visual_encoder.hidden_size
    torch.manual_seed(3)
    t, v = torch.randn(B, L, dt), torch.randn(B, nv, dv)
    t_hat, v_hat = torch.randn(B, L, dt, requires_grad=True), torch.randn(B, nv, dv, requires_grad=True)
    ones_t, ones_v = torch.ones(B, L), torch.ones(B, nv)
    out = BgaStreams(t, [], [], [], [], [], [])
    al._losses(out, t, v, t_hat, v_hat, ones_t, ones_v, ones_t.bool(), ones_v.bool(), torch.ones(B, dtype=torch.bool))
    out.cycle[0].sum().backward()
    assert t_hat.grad.abs().sum() > 0 and v_hat.grad.abs().sum() > 0
    generator_grads = [p.grad for g in (al.g_t2v, al.g_v2t) for p in g.parameters()]
    if cycle_grad == "first":
        assert all(g is None for g in generator_grads)
    else:
        assert all(g is not None for g in generator_grads) and any(g.abs().sum() > 0 for g in generator_grads)


def test_cycle_grad_first_computes_the_same_losses(make):
    batch = make_batch(make())
    losses = {}
    for mode in ("both", "first"):
        model = make(cycle_grad=mode, alpha=1.0).eval()
        s = model.aligner.streams(batch, model.text_encoder, model.visual_encoder, mode="generate")
        losses[mode] = torch.stack(s.cycle)
    assert torch.allclose(losses["both"], losses["first"])
    with pytest.raises(ConfigError, match="aligner.cycle_grad"):
        make(cycle_grad="second")


def test_mcg_false_is_structurally_bert_crf(make, encoders):
    model = make(mcg=False)
    assert model.aligner.uses_images is False
    assert sum(p.numel() for p in model.aligner.parameters()) == 0
    text = copy.deepcopy(encoders[0])
    torch.manual_seed(0)
    bertcrf = MnerModel(text, TextOnlyAligner(text), CrfDecoder(text.hidden_size, len(TAGS)))
    bertcrf.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("visual_encoder.")})
    c, t = model.parameter_counts(), bertcrf.parameter_counts()
    assert c["params_inference"] == t["params_inference"] == t["params_total"]
    model.eval(), bertcrf.eval()
    batch = make_batch(model)
    assert torch.equal(model._emissions(batch)[0], bertcrf._emissions(batch)[0])


# --------------------------------------------------------------------------- feature extractors (Eq. 8)


def test_run_layer_without_extra_tokens_equals_the_layers_own_forward(encoders):
    text, visual = encoders
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    layer = text.layers[0].eval()
    ext = torch.zeros(2, 1, 1, 6).masked_fill(~valid[:, None, None, :], torch.finfo(torch.float32).min)
    want = layer(x, attention_mask=ext)
    want = want[0] if isinstance(want, tuple) else want
    assert torch.allclose(run_layer(layer, x, valid)[valid], want[valid], atol=1e-5)
    block = visual.blocks[0].eval()
    v = torch.randn(2, visual.num_tokens, 32)
    assert torch.allclose(run_layer(block, v, torch.ones(2, visual.num_tokens, dtype=torch.bool)), block(v), atol=1e-5)


def test_extra_tokens_reach_the_layer_and_masked_extra_tokens_do_not(encoders):
    text = encoders[0]
    layer = text.layers[0].eval()
    torch.manual_seed(0)
    x, extra = torch.randn(1, 4, 32), torch.randn(1, 3, 32)
    valid = torch.ones(1, 4, dtype=torch.bool)
    plain = run_layer(layer, x, valid)
    with_extra = run_layer(layer, x, valid, extra, torch.ones(1, 3, dtype=torch.bool))
    masked = run_layer(layer, x, valid, extra, torch.zeros(1, 3, dtype=torch.bool))
    assert not torch.allclose(plain, with_extra, atol=1e-4)
    assert torch.allclose(plain, masked, atol=1e-6)


def test_layer_mapping_is_even_and_one_to_one_for_equal_depths():
    assert map_layers(6, 12, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert map_layers(12, 12, 11) == [[i] for i in range(11)]
    assert map_layers(2, 2, 1) == [[0]]
    assert map_layers(6, 3, 2) == [[0], [1]]
    with pytest.raises(ConfigError, match="bga_layers"):
        map_layers(6, 3, 5)


def test_the_text_extractors_are_the_text_encoder_layers_and_bridges_match_widths(encoders):
    from mner_bench.visual import ClipVitConfig, ClipVitEncoder

    text = copy.deepcopy(encoders[0])
    wide = ClipVitEncoder(ClipVitConfig(tiny=True, width=48, heads=2))
    a = BgaAligner(BgaAlignerConfig(), text, wide)
    ids = {id(p) for p in text.parameters()}
    assert not any(id(p) in ids for p in a.parameters())  # the layers are used, not copied
    assert a.text_extractors[0].bridge.weight.shape == (32, 48)
    assert a.visual_extractors[0].bridge.weight.shape == (48, 32)
    assert a.g_t2v.queries.shape == (wide.num_tokens, 48) and a.g_v2t.queries.shape == (128, 32)


def test_bad_settings_fail_with_the_key(encoders):
    text, visual = encoders
    with pytest.raises(ConfigError, match="aligner.inference_visual"):
        BgaAligner(BgaAlignerConfig(inference_visual="both"), text, visual)
    with pytest.raises(ConfigError, match="aligner.kl_softmax"):
        BgaAligner(BgaAlignerConfig(kl_softmax="x"), text, visual)
    with pytest.raises(ConfigError, match="visual encoder"):
        BgaAligner(BgaAlignerConfig(), text, None)
    with pytest.raises(ConfigError, match="aligner.bga_layers"):
        BgaAligner(BgaAlignerConfig(bga_layers=3), text, visual)
    assert BgaAligner(BgaAlignerConfig(mcg=False), text, None).uses_images is False


def test_a_few_steps_lower_the_generation_losses(make):
    model = make(alpha=1.0, scs=False)
    batch = make_batch(model, image_mask=(True, True, True))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    first = None
    for _ in range(5):
        out = model(batch)
        first = first or out.parts
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    # measured: 12.9 -> 6.3 (recon), 13.4 -> 6.4 (cycle)
    assert out.parts["loss_recon"] < 0.7 * first["loss_recon"] and out.parts["loss_cycle"] < 0.7 * first["loss_cycle"]


def test_the_image_free_inference_model_has_no_visual_module_and_predicts_the_same(make):
    """``build_model(cfg, inference=True)`` (``mner-bench predict``) builds bga without its
    visual encoder, visual SCS, G_v2t and visual extractors; the trained weights load into it
    and it predicts exactly what the full model predicts in eval mode."""
    from mner_bench.config import resolve_config
    from mner_bench.registry import get_registry
    from mner_bench.training import build_model

    reg = get_registry()
    overrides = [f"text_encoder.{k}" for k in ("random_init=true", *(f"overrides.{k}={v}" for k, v in TINY_TEXT.items()))]
    cfg = resolve_config(reg, "bga", None, [*overrides, "visual_encoder.tiny=true"])
    torch.manual_seed(0)
    full = build_model(cfg, reg).eval()
    small = build_model(cfg, reg, inference=True).eval()
    assert small.visual_encoder is None and small.aligner.uses_images is False
    assert not any(n.startswith(("aligner.visual_scs", "aligner.g_v2t", "aligner.visual_extractors"))
                   for n, _ in small.named_parameters())
    missing, unexpected = small.load_state_dict(full.state_dict(), strict=False)
    assert missing == [] and unexpected and all(k.startswith(tuple(small.skipped_at_inference)) for k in unexpected)
    assert small.parameter_counts()["params_total"] == full.parameter_counts()["params_inference"]
    batch = make_batch(full)
    assert torch.equal(small._emissions(batch)[0], full._emissions(batch)[0])
    real = resolve_config(reg, "bga", None, [*overrides, "visual_encoder.tiny=true", "aligner.inference_visual=real"])
    assert build_model(real, reg, inference=True).visual_encoder is not None


@pytest.mark.parametrize("encoder_lr", [True, False])
def test_bga_modules_train_at_the_encoder_lr_unless_told_otherwise(make, encoder_lr):
    from omegaconf import OmegaConf

    from mner_bench.training import make_optimizer

    model = make(encoder_lr=encoder_lr)
    cfg = OmegaConf.create({"train": {"lr": 3e-5, "head_lr": 1e-2, "weight_decay": 0.01, "warmup_ratio": 0.01}})
    opt, _ = make_optimizer(model, cfg, 10)
    lr_of = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}  # before warm-up
    want = 3e-5 if encoder_lr else 1e-2
    for mod in (model.aligner.g_t2v, model.aligner.g_v2t, model.aligner.text_scs, model.aligner.visual_scs):
        assert {lr_of[id(p)] for p in mod.parameters()} == {want}
    assert {lr_of[id(p)] for p in model.decoder.parameters()} == {1e-2}
    assert {lr_of[id(p)] for p in model.text_encoder.parameters()} == {3e-5}


def test_alignment_summary_on_a_hand_made_similarity_matrix():
    """Rows are tweets' generated features, columns images; labels as the synth sets give them."""
    from mner_bench_bga.analysis import summarise

    sim = torch.tensor([[0.9, 0.95, 0.1, 0.2],   # own image 2nd, beaten by an image of its own label only
                        [0.5, 0.4, 0.6, 0.1],    # own image beaten by an image of another label
                        [0.1, 0.2, 0.7, 0.7],    # tie with an image of another label: counts against
                        [0.0, 0.1, 0.2, 0.3]])   # own image first
    m = summarise(sim, ["PER", "PER", "LOC", "ORG"])
    assert m["align_top1"] == 0.5  # tweet 3, and tweet 2 (argmax: the first of the tie, its own)
    assert m["align_top1_same_label"] == 0.75  # tweets 0 (best: image 1, PER), 2 and 3
    assert m["align_top1_other_labels"] == 0.5  # tweets 0 and 3
    assert m["align_top1_other_labels_chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 4 + 1 / 4) / 4)
    assert m["align_pairwise"] == pytest.approx((2 + 1 + 2 + 3) / 12)
    assert "align_top1_other_labels" not in summarise(sim, None)
    # images 0 and 1 pixel-identical (one group): for tweet 0, image 1 is its own image
    g = summarise(sim, ["PER", "PER", "LOC", "ORG"], groups=["a", "a", "b", "c"])
    assert g["align_top1"] == 0.75  # tweets 0, 2 and 3
    assert g["align_pairwise"] == pytest.approx((2 + 1 + 2 + 3) / 10)  # identical copies are no competitors
    assert g["align_sim_other"] == pytest.approx(float(sim.sum() - sim.diagonal().sum() - 0.95 - 0.5) / 10)


def test_image_groups_are_equal_for_identical_images_only():
    from mner_bench_bga.analysis import image_groups

    x = torch.rand(3, 3, 8, 8)
    x[2] = x[0]
    g = image_groups(x)
    assert g[0] == g[2] and g[0] != g[1]
    x[2, 0, 0, 0] += 1e-3
    assert len(set(image_groups(x))) == 3


def test_same_image_marks_copies_of_the_own_image():
    from mner_bench_bga.analysis import same_image

    assert torch.equal(same_image(3), torch.eye(3, dtype=torch.bool))
    expected = torch.tensor([[True, False, True], [False, True, False], [True, False, True]])
    assert torch.equal(same_image(3, ["a", "b", "a"]), expected)


def vis_n(model: MnerModel) -> int:
    return model.visual_encoder.num_tokens


def crop_batch(model: MnerModel, crop_mask) -> Batch:
    """``make_batch`` with two crop slots per tweet (random pixels) and the given slot mask."""
    batch = make_batch(model)
    size = model.visual_encoder.image_size
    g = torch.Generator().manual_seed(2)
    batch.crops, batch.crop_mask = torch.randn(3, 2, 3, size, size, generator=g), torch.tensor(crop_mask)
    return batch


def test_crop_slots_append_each_crops_tokens_and_mask_the_missing_ones(make):
    model = make(crops=2).eval()
    vis, n = model.visual_encoder, model.visual_encoder.num_tokens
    assert model.aligner.g_t2v.num_queries == 3 * n  # Q_v: the image's tokens and two slots'
    batch = crop_batch(model, [[True, False], [False, False], [True, True]])
    with torch.no_grad():
        s = model.aligner.streams(batch, model.text_encoder, vis, mode="generate")
        v0 = s.real_visual[0]
        assert v0.shape[1] == 3 * n and s.generated_visual[0].shape[1] == 3 * n
        assert torch.allclose(v0[0, n:2 * n], vis.embed(batch.crops[0, :1])[0])
        assert torch.allclose(v0[2, 2 * n:], vis.embed(batch.crops[2, 1:])[0])
        assert not v0[0, 2 * n:].any() and not v0[1, n:].any()  # empty slots stay zero
        for mv in s.visual_masks:  # the visual SCS never keeps an empty slot's tokens
            assert not mv[0, 2 * n:].any() and not mv[1, n:].any() and mv[2].sum() > 0
        # an empty slot's pixels are never read: same streams and losses whatever they hold
        batch.crops[1] = torch.randn_like(batch.crops[1]) * 10
        s2 = model.aligner.streams(batch, model.text_encoder, vis, mode="generate")
    assert torch.equal(s.text, s2.text)
    assert all(torch.equal(a, b) for a, b in zip(s.recon, s2.recon, strict=True))


def test_crop_slots_change_what_is_learned_not_image_free_inference(make):
    from mner_bench_bga.plugin import make_aligner

    model = make(crops=2)
    batch = crop_batch(model, [[True, False], [False, False], [True, True]])
    loss = model(batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.aligner.g_t2v.queries.grad[vis_n(model):].abs().sum() > 0
    model.eval()
    # the image-free model, sized from the checkpoint (queries of the image and both slots)
    cfg = BgaAlignerConfig(crops=2, mcg_ff=64)
    text = copy.deepcopy(model.text_encoder)
    small_aligner = make_aligner(cfg, text, None, inference=True, state=model.state_dict())
    assert small_aligner.g_t2v.num_queries == 3 * vis_n(model)
    small = MnerModel(text, small_aligner, copy.deepcopy(model.decoder), None)
    small.load_state_dict(model.state_dict(), strict=False)
    small.eval()
    with torch.no_grad():
        assert torch.equal(small._emissions(make_batch(model, images=False))[0], model._emissions(batch)[0])


def test_crops_in_the_data_without_crop_slots_warn_once(make, caplog):
    model = make()
    batch = crop_batch(model, [[True, False], [False, False], [True, True]])
    with caplog.at_level("WARNING", logger="mner_bench_bga.model"):
        model(batch)
        model(batch)
    assert sum("aligner.crops=0" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ConfigError, match="aligner.crops"):
        make(crops=-1)


# --------------------------------------------------------------------------- through the runner


def test_a_tiny_run_logs_generation_losses_per_epoch_and_the_alignment_analysis(tmp_path, monkeypatch):
    """``mner-bench run bga`` on a tiny generated data set with images, then
    ``analyze-alignment`` on its output folder: both log to the run's MLflow run."""
    from mlflow.tracking import MlflowClient
    from mner_bench_bga.analysis import analyze_alignment

    from mner_bench.config import resolve_config
    from mner_bench.registry import get_registry
    from mner_bench.training import run

    reg = get_registry()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"text_encoder.{k}" for k in ("random_init=true", *(f"overrides.{k}={v}" for k, v in TINY_TEXT.items()))]
    overrides += ["visual_encoder.tiny=true", "data.dataset=synth-consistent", "data.synth.train_size=8",
                  "data.synth.dev_size=4", "data.synth.test_size=6", "train.epochs=2", "train.batch_size=4",
                  "tracking.measure_speed=false", f"tracking.uri={uri}", f"output_dir={tmp_path / 'runs'}", "quiet=true"]
    result = run(resolve_config(reg, "bga", None, overrides), reg)
    client = MlflowClient(uri)
    for key in ("loss_recon", "loss_cycle", "loss_bga"):
        history = client.get_metric_history(result.tracking_id, key)
        assert [m.step for m in history] == [1, 2] and all(m.value > 0 for m in history), key
    assert result.metrics["params_inference"] < result.metrics["params_total"]

    monkeypatch.chdir(tmp_path)  # the run folder as a user types it: relative to the working folder
    res = analyze_alignment(str(result.output_dir.relative_to(tmp_path)), reg)
    assert res.tweets == 6 and res.mlflow_run_id == result.tracking_id
    m = client.get_run(result.tracking_id).data.metrics
    assert m["align_top1"] == pytest.approx(res.metrics["align_top1"])
    # synth-consistent: one picture per name, so tweets that name the same entity share an image
    from mner_bench.synth import SynthConfig, entity_words, generate

    names = {entity_words(t) for t in generate("consistent", "test", SynthConfig(train_size=8, dev_size=4, test_size=6))}
    assert m["align_images"] == len(names) and m["align_top1_chance"] == pytest.approx(1 / len(names))
    assert 0 <= m["align_pairwise"] <= 1 and "align_top1_same_label" in m and "align_sim_own_l0" in m
    assert (result.output_dir / "alignment.png").stat().st_size > 0
    # another checkpoint file of the run (here a copy of best.pt, marked as epoch 7): the same
    # weights give the same figures, logged at that epoch's step; a missing file is an error
    from mner_bench.errors import MnerBenchError

    ckpt = torch.load(result.output_dir / "checkpoints" / "best.pt", weights_only=True)
    torch.save({**ckpt, "epoch": 7}, tmp_path / "other.pt")
    again = analyze_alignment(str(result.output_dir), reg, checkpoint=tmp_path / "other.pt")
    assert again.epoch == 7 and again.metrics == res.metrics
    steps = {m.step for m in client.get_metric_history(result.tracking_id, "align_top1")}
    assert steps == {res.epoch, 7}
    with pytest.raises(MnerBenchError, match="no such checkpoint"):
        analyze_alignment(str(result.output_dir), reg, checkpoint=tmp_path / "missing.pt")
    # another split: its own files and metric names; the test figures stay as they were
    train = analyze_alignment(str(result.output_dir), reg, split="train")
    m = client.get_run(result.tracking_id).data.metrics
    assert m["train_align_top1"] == pytest.approx(train.metrics["align_top1"]) and train.tweets == 8
    assert m["align_top1"] == pytest.approx(res.metrics["align_top1"])
    assert set(train.files.values()) == {result.output_dir / "alignment_train.json", result.output_dir / "alignment_train.png"}

    # Table 4: the same checkpoint scored with real visual features (mner-bench evaluate)
    from mner_bench.evaluate import evaluate_run

    generated = evaluate_run(result.output_dir, registry=reg)
    assert generated.scores.f1 == result.metrics["test_f1"]
    real = evaluate_run(result.output_dir, ["aligner.inference_visual=real"], registry=reg)
    assert real.image_metrics["images_found"] > 0 and 0.0 <= real.scores.f1 <= 1.0

    # the image-free model loads from the run's files, sized from its checkpoint, in a process
    # that never imports the visual encoder's library (mner-bench predict, the MLflow pyfunc)
    import ast
    import subprocess
    import sys

    code = ("import sys; from mner_bench.predict import Predictor; "
            f"p = Predictor.from_run({str(result.output_dir)!r}, device='cpu'); "
            "print(p.tag([['Obama', 'visits', 'Paris']])); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'open_clip'))")
    # (torchvision is not a sign of the visual encoder: transformers' modeling_utils imports it)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    tags, imported = out.stdout.strip().splitlines()[-2:]
    assert len(ast.literal_eval(tags)[0]) == 3 and imported == "[]"
