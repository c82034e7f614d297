"""Helpers shared by the benchmark modules: building a method's model the way the suite does,
its batcher (with images from the run's disk cache where the method uses them), and the
number of timed rounds."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from mner_bench.config import resolve_config
from mner_bench.errors import MnerBenchError
from mner_bench.images import ImageCache, ImageDirectory, ImageProvider
from mner_bench.model import MnerModel
from mner_bench.training import Batcher, build_model

#: the methods benchmarked, each on its default config (MiniLM text encoder; clip-vit-b32 with
#: random weights where the pretrained checkpoint is not cached)
METHODS = ("bertcrf", "bga", "umt")

#: per-method overrides. UMT's visual encoder is frozen and by default memoises each image's
#: tokens for the run: a benchmark that repeats the same batch would then time UMT without its
#: ViT after the first round. Turned off, so that every round encodes its images, as the first
#: epoch and the prediction of new tweets do.
METHOD_OVERRIDES: dict[str, list[str]] = {"umt": ["visual_encoder.cache_features=false"]}

#: every run's settings: no MLflow, no progress bars
RUN_OVERRIDES = ["tracking.enabled=false", "quiet=true"]

#: timed rounds of the heavy benchmarks (model forward/backward), after one warm-up round
ROUNDS = int(os.environ.get("MNER_BENCH_ROUNDS", "3"))


def heavy(benchmark, fn: Callable[[], object], rounds: int = ROUNDS, warmup: bool = True):
    """Time ``fn`` for ``rounds`` rounds of one call each, after one untimed warm-up call
    (``warmup=False``: none; the first round then carries the one-time costs, which the
    ``min`` of the rounds leaves out)."""
    return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=int(warmup), iterations=1)


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config(registry, method: str, device: torch.device, extra: Sequence[str] = ()):
    """The method's resolved default config for ``device`` (precision ``auto``: bf16 autocast
    on CUDA, fp32 on the CPU)."""
    if method not in registry.list_components("method"):
        pytest.skip(f"method '{method}' is not registered in this installation")
    overrides = [*RUN_OVERRIDES, *METHOD_OVERRIDES.get(method, []), f"train.device={device}", *extra]
    return resolve_config(registry, method, None, overrides)


def build(registry, cfg, device: torch.device, inference: bool = False) -> MnerModel:
    """``build_model`` on ``device``; a method that does not build here (another engineer may
    still be finishing it) skips its benchmarks with the reason."""
    try:
        model = build_model(cfg, registry, inference=inference)
    except (MnerBenchError, ImportError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
        pytest.skip(f"method '{cfg.method}' does not build in this checkout ({type(exc).__name__}: {exc})")
    return model.to(device)


def make_batcher(model: MnerModel, image_dir: Path | None, cache: ImageCache | None) -> Batcher:
    """The suite's batcher; methods whose aligner uses images read them from ``image_dir``
    through its disk cache (what a run does from its second run on)."""
    provider = None
    if getattr(model.aligner, "uses_images", False):
        enc = model.visual_encoder
        if cache is not None and cache.size != enc.image_size:
            raise ValueError(f"the image cache holds {cache.size}-pixel images; the visual encoder needs {enc.image_size}")
        provider = ImageProvider(enc.image_size, enc.mean, enc.std, directory=ImageDirectory(image_dir), cache=cache)
    return Batcher(model.text_encoder.tokenizer.pad_token_id, provider)
