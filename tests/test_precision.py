"""Devices and mixed precision go through one code path: ``train.precision=bf16`` turns on
autocast on the CPU exactly as ``auto`` does on CUDA, so the CPU exercises the GPU's path."""

import json
import math

import pytest
import torch

import mner_bench.registry as registry_module
from mner_bench.cli import main
from mner_bench.config import resolve_config
from mner_bench.data import parse_conll
from mner_bench.registry import get_registry
from mner_bench.training import Batcher, autocast_dtype, build_model, encode_split, predict_split

from .conftest import FIXTURE_CONLL, tiny_overrides

METHODS = get_registry().list_components("method")
CPU = torch.device("cpu")


def test_autocast_dtype_per_device_and_precision():
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("fp32", cuda) is None


class RandomImages:
    """An image provider that gives every tweet a fixed random image (for tiny visual encoders)."""

    def __init__(self, size: int):
        self.image_size = size

    def __call__(self, tweets):
        gen = torch.Generator().manual_seed(0)
        return torch.randn(len(tweets), 3, self.image_size, self.image_size, generator=gen), torch.ones(len(tweets), dtype=torch.bool)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_trains_and_predicts_on_the_cpu(method):
    torch.manual_seed(0)
    tweets = parse_conll(FIXTURE_CONLL)
    reg = get_registry()
    cfg = resolve_config(reg, method, None, [*tiny_overrides(method), "train.precision=bf16", "train.device=cpu"])
    amp = autocast_dtype(cfg.train.precision, CPU)
    assert amp is torch.bfloat16
    model = build_model(cfg, reg)
    images = RandomImages(model.visual_encoder.image_size) if getattr(model.aligner, "uses_images", False) else None
    batcher = Batcher(model.text_encoder.tokenizer.pad_token_id, images)
    split = encode_split(tweets, model, cfg.data.max_length)
    batch = batcher(split, range(len(tweets)))

    model.train()
    with torch.autocast(CPU.type, dtype=amp):
        emissions, _ = model._emissions(batch)
        out = model(batch)
    assert emissions.dtype == torch.bfloat16  # autocast is really on
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)  # the CRF loss runs in fp32
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.decoder.parameters())

    pred = predict_split(model, batcher, split, 2, CPU, amp)  # the trainer's evaluation loop
    assert [len(p) for p in pred] == [len(t.tokens) for t in tweets]


def test_a_whole_run_with_bf16_on_the_cpu(tmp_path, monkeypatch, fixture_registry, tiny_run_overrides):
    monkeypatch.setattr(registry_module, "_REGISTRY", fixture_registry)
    rc = main(["run", "bertcrf", *tiny_run_overrides, "train.precision=bf16", "train.device=cpu",
               "tracking.enabled=false", "train.epochs=1"])
    assert rc == 0
    (out,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["test_f1"] <= 1.0
    assert math.isfinite(metrics["latency_ms_b1"]) and metrics["throughput_b32"] > 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
