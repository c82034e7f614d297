"""Inference per method at batch 1 and 32, through the trainer's own evaluation loop
(:func:`~mner_bench.training.predict_split`: collation, images, device transfer, autocast,
decoding to tags), on the CPU and, where there is one, on CUDA with bf16 autocast.

* ``bertcrf``: MiniLM + CRF.
* ``bga``: built for inference as ``mner-bench predict`` builds it: image-free, without its
  visual encoder (``aligner.inference_visual=generated``); no images are loaded.
* ``umt``: with images (generated JPEGs read through the suite's disk cache), its CLIP ViT-B/32
  encoding every image in every round (see ``common.METHOD_OVERRIDES``).

The t15 test split's first tweets are used (batch 1: the first; batch 32: the first 32).
"""

from __future__ import annotations

import pytest

from mner_bench.training import autocast_dtype, encode_split, predict_split

from .common import METHODS, ROUNDS, build, config, heavy, make_batcher, sync

BATCHES = [
    pytest.param(1, id="b1", marks=pytest.mark.benchmark(group="inference: batch 1")),
    pytest.param(32, id="b32", marks=pytest.mark.benchmark(group="inference: batch 32")),
]
#: timed rounds per batch size (batch 1 is cheap: more rounds)
ROUNDS_FOR = {1: 10}


@pytest.fixture(scope="module")
def inference_models(registry, image_dir, image_cache):
    """``get(method, device) -> (model, batcher, cfg)``, built once per module."""
    built: dict = {}

    def get(method, device):
        key = (method, device.type)
        if key not in built:
            cfg = config(registry, method, device)
            model = build(registry, cfg, device, inference=True).eval()
            built[key] = (model, make_batcher(model, image_dir, image_cache), cfg)
        return built[key]

    yield get
    built.clear()


@pytest.mark.parametrize("batch_size", BATCHES)
@pytest.mark.parametrize("method", METHODS)
def test_inference(benchmark, method, batch_size, device, inference_models, t15):
    model, batcher, cfg = inference_models(method, device)
    split = encode_split(t15["test"][:batch_size], model, cfg.data.max_length)
    amp = autocast_dtype(cfg.train.precision, device)
    uses_images = batcher.image_provider is not None
    if method == "bga":
        assert model.visual_encoder is None and not uses_images  # image-free
    if method == "umt":
        assert uses_images and model.visual_encoder is not None
    benchmark.extra_info.update({
        "key": f"inference/{method}/b{batch_size}/{device.type}", "method": method, "batch_size": batch_size,
        "device": device.type, "autocast": str(amp) if amp else "fp32", "images": uses_images,
        "params_inference": model.parameter_counts()["params_inference"],
        "sub_tokens": int(batcher(split, range(len(split)), labelled=False).text.input_ids.numel()),
    })

    def predict():
        out = predict_split(model, batcher, split, batch_size, device, amp)
        sync(device)
        return out

    out = heavy(benchmark, predict, rounds=ROUNDS_FOR.get(batch_size, ROUNDS))
    assert [len(p) for p in out] == [len(t.tokens) for t in split.tweets]
    benchmark.extra_info.update(count_flops(predict))


def count_flops(fn) -> dict:
    """Floating-point work of one untimed call (``torch.utils.flop_counter``: matrix products and
    attention), in GFLOP, overall and per part of the model (``Class.attribute``, one level
    deep), so that a time ratio can be set beside the ratio of the work."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()
    parts = {name: sum(ops.values()) / 1e9 for name, ops in counts.items() if name.count(".") == 1}
    return {"gflop": counter.get_total_flops() / 1e9, "gflop_parts": dict(sorted(parts.items()))}
