"""Visual encoders: tiny configurations through the registry; full sizes counted in a slow test."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from mner_bench.errors import ConfigError
from mner_bench.registry import get_registry
from mner_bench.visual import (
    FULL_SIZE_PARAMS,
    ClipVitConfig,
    ClipVitEncoder,
    ResNetConfig,
    ResNetEncoder,
)


def build(name: str, **overrides):
    spec = get_registry().spec("visual_encoder", name)
    cfg = OmegaConf.merge(OmegaConf.structured(spec.config_class), overrides)
    return get_registry().create_component("visual_encoder", name, cfg)


def test_tiny_clip_gives_cls_plus_patch_tokens_and_runs_block_by_block(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="mner_bench.visual"):
        enc = build("clip-vit-b32", tiny=True)
    assert "RANDOM WEIGHTS" in caplog.text and enc.random_init
    assert (enc.hidden_size, enc.image_size, enc.num_tokens) == (32, 32, 17)
    x = torch.randn(3, 3, 32, 32)
    out = enc(x)
    assert out.shape == (3, 17, 32)
    h = enc.embed(x)
    assert h.shape == (3, 17, 32)
    assert isinstance(enc.blocks, torch.nn.ModuleList) and len(enc.blocks) == 2
    for block in enc.blocks:  # batch-first: [B, N, W] in and out
        h = block(h)
        assert h.shape == (3, 17, 32)
    assert torch.allclose(enc.final_norm(h), out, atol=1e-6)
    assert enc.tower.proj is None  # the joint-space projection is not part of the encoder
    assert enc.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    out.sum().backward()
    assert enc.tower.conv1.weight.grad.abs().sum() > 0


def test_tiny_resnet_gives_a_grid_of_regions():
    enc = build("resnet152", tiny=True, grid=2)
    assert (enc.hidden_size, enc.image_size, enc.num_tokens) == (512, 32, 4)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 4, 512)
    # regions are the pooled map's cells, row by row: the mean over regions is the global pool
    enc.eval()
    x = torch.randn(2, 3, 64, 64)
    feats = enc.stages(enc.stem(x))
    assert torch.allclose(enc(x).mean(1), feats.mean((2, 3)), atol=1e-5)
    assert enc.mean == (0.485, 0.456, 0.406) and enc.random_init


def test_frozen_encoders_have_no_gradients_and_stay_in_eval_mode():
    enc = ResNetEncoder(ResNetConfig(tiny=True, freeze=True))
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    before = enc.stem[1].running_mean.clone()
    out = enc(torch.randn(2, 3, 32, 32))
    assert not out.requires_grad and torch.equal(enc.stem[1].running_mean, before)
    clip = ClipVitEncoder(ClipVitConfig(tiny=True, freeze=True))
    assert not clip(torch.randn(1, 3, 32, 32)).requires_grad


def test_architecture_overrides_and_their_errors():
    enc = ClipVitEncoder(ClipVitConfig(tiny=True, image_size=48, patch_size=16, width=16, layers=1, heads=4))
    assert enc(torch.randn(1, 3, 48, 48)).shape == (1, 10, 16)
    with pytest.raises(ConfigError, match="image_size=50 is not a multiple of visual_encoder.patch_size=16"):
        ClipVitEncoder(ClipVitConfig(tiny=True, image_size=50, patch_size=16))


def test_pretrained_weights_that_are_not_available_fail_or_warn(tmp_path, caplog):
    with pytest.raises(ConfigError, match="neither an open_clip tag of ViT-B-32 .*openai"):
        ClipVitEncoder(ClipVitConfig(pretrained="no-such-tag"))
    with pytest.raises(ConfigError, match="require_pretrained=true"):
        ClipVitEncoder(ClipVitConfig(tiny=True, require_pretrained=True))
    with pytest.raises(ConfigError, match="neither a ResNet152_Weights name"):
        ResNetEncoder(ResNetConfig(weights="IMAGENET9K"))
    bad = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="not a ResNet-152 state dict"):
        ResNetEncoder(ResNetConfig(weights=str(bad)))


@pytest.mark.slow
def test_full_size_parameter_counts_and_shapes(tmp_path):
    """Builds ViT-B/32 and ResNet-152 (random weights, offline): about 10-20 s on a laptop CPU."""
    clip = build("clip-vit-b32")
    resnet = build("resnet152")
    counts = {"clip-vit-b32": sum(p.numel() for p in clip.parameters()),
              "resnet152": sum(p.numel() for p in resnet.parameters())}
    assert counts == FULL_SIZE_PARAMS
    with torch.no_grad():
        assert clip(torch.randn(1, 3, 224, 224)).shape == (1, 50, 768)
        assert resnet(torch.randn(1, 3, 224, 224)).shape == (1, 49, 2048)
    assert len(clip.blocks) == 12 and clip.random_init  # no weights are cached on the test machines
    # a local state-dict file is loaded as the pretrained weights
    path = tmp_path / "r152.pt"
    state = {k: v for k, v in resnet.state_dict().items()}
    state.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save({f"{k}": v for k, v in _torchvision_names(state).items()}, path)
    loaded = build("resnet152", weights=str(path))
    assert not loaded.random_init
    assert torch.equal(loaded.stem[0].weight, resnet.stem[0].weight)


def _torchvision_names(state: dict) -> dict:
    """Our module names (stem.0, stages.3, ...) -> torchvision's (conv1, layer4, ...)."""
    stem = {"stem.0.": "conv1.", "stem.1.": "bn1."}
    out = {}
    for k, v in state.items():
        for a, b in stem.items():
            if k.startswith(a):
                k = b + k[len(a):]
        if k.startswith("stages."):
            i, rest = k[len("stages."):].split(".", 1)
            k = f"layer{int(i) + 1}.{rest}"
        out[k] = v
    return out


def test_frozen_encoder_computes_each_distinct_image_once():
    torch.manual_seed(0)
    enc = ClipVitEncoder(ClipVitConfig(tiny=True, freeze=True))
    x = torch.randn(3, 3, 32, 32)
    first = enc(x)
    assert (enc.feature_misses, enc.feature_hits) == (3, 0)
    again = enc(torch.cat([x[1:], torch.randn(1, 3, 32, 32)]))  # two seen, one new
    assert (enc.feature_misses, enc.feature_hits) == (4, 2)
    assert torch.equal(again[:2], first[1:])
    assert torch.allclose(first, enc._tokens(x), atol=1e-6)  # the same as computing them
    off = ClipVitEncoder(ClipVitConfig(tiny=True, freeze=True, cache_features=False))
    off(x)
    off(x)
    assert off.feature_hits == 0 and not off._features
    full = ResNetEncoder(ResNetConfig(tiny=True, freeze=True, feature_cache_mb=0))
    full(x)
    full(x)
    assert full.feature_hits == 0 and full.feature_misses == 6  # over the memory cap: recomputed
