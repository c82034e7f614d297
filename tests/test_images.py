"""Image handling: decoding every kind of bad file, preprocessing, the disk cache, the provider."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mner_bench import images as im_mod
from mner_bench.data import Tweet
from mner_bench.errors import ConfigError
from mner_bench.images import (
    ImageCache,
    ImageDirectory,
    ImageProvider,
    ImageUnusable,
    load_image,
    make_image_provider,
    normalise,
)

S = 16
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tweet(imgid: str) -> Tweet:
    return Tweet(imgid, ["x"], ["O"])


def solid(colour, size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


@pytest.fixture
def image_dir(tmp_path):
    """good / greyscale / CMYK / RGBA images and every kind of broken file."""
    d = tmp_path / "images"
    d.mkdir()
    solid((200, 10, 10)).save(d / "good.jpg", quality=95)
    solid(100, mode="L").save(d / "grey.png")
    solid((0, 0, 0, 0), mode="CMYK").save(d / "cmyk.jpg", quality=95)
    solid((255, 0, 0, 0), mode="RGBA").save(d / "clear.png")  # fully transparent red -> white
    solid((0, 0, 255), size=(30, 40)).save(d / "upper.JPEG", quality=95)  # other extension, any case
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    full = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(full).save(d / "trunc_src.jpg", quality=95)
    data = (d / "trunc_src.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(data[: len(data) // 2])
    os.remove(d / "trunc_src.jpg")
    solid((0, 255, 0), size=(4, 4)).save(d / "tiny.png")
    (d / "notes.txt").write_text("ignored: not an image extension")
    return d


GOOD = ["good", "grey", "cmyk", "clear", "upper"]
CORRUPT = ["zero", "text", "trunc", "tiny"]
MISSING = ["absent"]


def test_bad_images_are_masked_zeroed_and_counted_once(image_dir):
    metrics: dict = {}
    provider = ImageProvider(S, MEAN, STD, directory=ImageDirectory(image_dir), min_side=8, metrics=metrics)
    tweets = [tweet(i) for i in GOOD + CORRUPT + MISSING]
    for _epoch in range(2):  # a second epoch over the same tweets counts nothing again
        images, mask = provider(tweets)
    assert images.shape == (len(tweets), 3, S, S) and images.dtype == torch.float32
    assert mask.tolist() == [True] * len(GOOD) + [False] * (len(CORRUPT) + len(MISSING))
    assert torch.all(images[~mask] == 0)
    assert metrics["images_found"] == 5 and metrics["images_corrupt"] == 4 and metrics["images_missing"] == 1
    assert metrics["image_load_seconds_total"] > 0
    # the same IMGIDs in other tweets (another split) are counted once more
    provider([tweet("good"), tweet("absent")])
    assert metrics["images_found"] == 6 and metrics["images_missing"] == 2


@pytest.mark.parametrize("name, reason", [("zero.jpg", "empty file"), ("text.jpg", "not a readable image"),
                                          ("trunc.jpg", "cannot decode"), ("tiny.png", "too small")])
def test_each_unusable_file_says_why(image_dir, name, reason):
    with pytest.raises(ImageUnusable, match=reason):
        load_image(image_dir / name, S, min_side=8)


def test_modes_become_the_expected_rgb(image_dir):
    def centre(name):
        return load_image(image_dir / name, S)[S // 2, S // 2].tolist()

    assert centre("grey.png") == [100, 100, 100]
    assert centre("cmyk.jpg") == pytest.approx([255, 255, 255], abs=2)  # no ink: white
    assert centre("clear.png") == [255, 255, 255]  # transparent on white, not the hidden red
    r, g, b = centre("good.jpg")
    assert r > 180 and g < 40 and b < 40
    solid((10, 20, 30, 255), mode="RGBA").save(image_dir / "opaque.png")
    assert centre("opaque.png") == [10, 20, 30]
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(image_dir / "deep.png")
    assert centre("deep.png") == [255, 255, 255]


def test_preprocessing_is_deterministic_and_matches_open_clip_eval_transform(tmp_path):
    import open_clip

    # three vertical bands: resize shorter side + centre crop keeps only the middle one
    band = np.zeros((32, 96, 3), dtype=np.uint8)
    band[:, :32] = (255, 0, 0)
    band[:, 32:64] = (0, 255, 0)
    band[:, 64:] = (0, 0, 255)
    Image.fromarray(band).save(tmp_path / "bands.png")
    a = load_image(tmp_path / "bands.png", S)
    b = load_image(tmp_path / "bands.png", S)
    assert np.array_equal(a, b)
    assert np.all(a[:, 3:13] == (0, 255, 0))  # the middle band fills the crop (edges blend)
    noise = (np.random.default_rng(1).random((50, 90, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    ref = open_clip.image_transform(S, is_train=False, mean=MEAN, std=STD)(Image.open(tmp_path / "noise.png"))
    ours = normalise(load_image(tmp_path / "noise.png", S)[None], MEAN, STD)[0]
    assert torch.allclose(ref, ours, atol=1e-6)


def test_huge_images_use_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(im_mod, "MAX_DECODE_PIXELS", 300_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400_000)  # PIL alone would refuse these as bombs
    solid((0, 0, 250), size=(2000, 1000)).save(tmp_path / "huge.jpg", quality=90)
    solid((0, 0, 250), size=(2000, 1000)).save(tmp_path / "huge.png")
    arr = load_image(tmp_path / "huge.jpg", S)  # decoded at 1/8 scale: 250x125 pixels
    assert arr.shape == (S, S, 3) and abs(int(arr[8, 8, 2]) - 250) < 6
    with pytest.raises(ImageUnusable, match="too large to decode with bounded memory"):
        load_image(tmp_path / "huge.png", S)
    assert Image.MAX_IMAGE_PIXELS == 400_000  # PIL's own limit is restored


# --------------------------------------------------------------------------- the disk cache


def test_cache_is_built_once_then_read_without_decoding(image_dir, tmp_path, monkeypatch):
    ids = GOOD + CORRUPT + MISSING
    d = ImageDirectory(image_dir)
    first = ImageCache.open_or_build(tmp_path / "cache", d, ids, S, 8)
    assert not first.hit and first.built_seconds > 0
    assert first.array.shape == (len(GOOD) + len(CORRUPT), S, S, 3) and first.array.dtype == np.uint8

    def no_decoding(*a, **k):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(im_mod, "load_image", no_decoding)
    second = ImageCache.open_or_build(tmp_path / "cache", ImageDirectory(image_dir), ids, S, 8)
    assert second.hit and second.path == first.path
    metrics: dict = {}
    provider = ImageProvider(S, MEAN, STD, directory=d, cache=second, min_side=8, metrics=metrics)
    images, mask = provider([tweet(i) for i in ids])
    assert mask.tolist() == [True] * 5 + [False] * 5
    assert metrics["image_cache_hit"] == 1.0 and metrics["images_corrupt"] == 4
    monkeypatch.undo()
    want = normalise(load_image(image_dir / "good.jpg", S)[None], MEAN, STD)[0]
    assert torch.equal(images[0], want)


def test_cache_is_not_reused_when_a_file_or_the_size_changes(image_dir, tmp_path):
    root = tmp_path / "cache"
    ids = ["good", "absent"]
    base = ImageCache.open_or_build(root, ImageDirectory(image_dir), ids, S, 8)
    assert base.get("good")[1][0, 0, 0] > 180  # red
    other_size = ImageCache.open_or_build(root, ImageDirectory(image_dir), ids, 2 * S, 8)
    assert not other_size.hit and other_size.path.parent != base.path.parent
    assert other_size.array.shape[1:] == (2 * S, 2 * S, 3)

    solid((10, 10, 200)).save(image_dir / "good.jpg", quality=95)  # same name, new content
    st = os.stat(image_dir / "good.jpg")
    os.utime(image_dir / "good.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = ImageCache.open_or_build(root, ImageDirectory(image_dir), ids, S, 8)
    assert not changed.hit and changed.path != base.path
    assert changed.get("good")[1][0, 0, 2] > 180  # blue now

    solid((0, 200, 0)).save(image_dir / "absent.png")  # a missing image appears
    appeared = ImageCache.open_or_build(root, ImageDirectory(image_dir), ids, S, 8)
    assert not appeared.hit and appeared.get("absent")[0] == "found"

    moved = tmp_path / "moved"
    os.rename(image_dir, moved)  # same files in another folder: another cache
    elsewhere = ImageCache.open_or_build(root, ImageDirectory(moved), ids, S, 8)
    assert not elsewhere.hit and elsewhere.path.parent != appeared.path.parent


# --------------------------------------------------------------------------- from a run config


@dataclass
class FakeEncoder:
    image_size: int = S
    mean: tuple = MEAN
    std: tuple = STD
    random_init: bool = True


def _ctx(fixture_registry, tmp_path, overrides=()):
    from mner_bench.config import resolve_config
    from mner_bench.training import RunContext

    cfg = resolve_config(fixture_registry, "bertcrf", None,
                         ["data.dataset=fixture", f"data.data_dir={tmp_path / 'data'}",
                          f"data.image_cache_dir={tmp_path / 'cache'}", *overrides])
    return cfg, SimpleNamespace(visual_encoder=FakeEncoder()), RunContext(cfg, tmp_path, "r", fixture_registry)


def test_no_image_folder_runs_without_images_and_says_so_once(fixture_registry, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MNER_BENCH_IMAGES", raising=False)
    cfg, model, ctx = _ctx(fixture_registry, tmp_path)
    with caplog.at_level(logging.WARNING, logger="mner_bench.images"):
        provider = make_image_provider(cfg, model, ctx)
        images, mask = provider([tweet("10"), tweet("20")])
        provider([tweet("30")])
    assert [r.getMessage().startswith("NO IMAGES") for r in caplog.records] == [True]
    assert not mask.any() and torch.all(images == 0)
    assert ctx.tags["images"] == "none" and ctx.tags["visual_weights"] == "random"
    assert ctx.extras["final_metrics"]["images_missing"] == 3
    assert ctx.extras["image_provider"] is provider


def test_image_folder_that_does_not_exist_is_a_config_error(fixture_registry, tmp_path, monkeypatch):
    cfg, model, ctx = _ctx(fixture_registry, tmp_path, [f"data.image_dir={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"data.image_dir.*nope does not exist"):
        make_image_provider(cfg, model, ctx)
    monkeypatch.setenv("MNER_BENCH_IMAGES", str(tmp_path / "nope2"))
    cfg, model, ctx = _ctx(fixture_registry, tmp_path)
    with pytest.raises(ConfigError, match=r"MNER_BENCH_IMAGES.*nope2 does not exist"):
        make_image_provider(cfg, model, ctx)


def test_run_provider_builds_the_cache_for_all_splits_and_withholds_test(fixture_registry, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for imgid in ("10", "20", "30", "40"):  # train copy 0 (ids are <tweet><copy>)
        solid((0, 200, 0)).save(d / f"{imgid}.jpg")
    for imgid in ("11", "21"):
        solid((0, 200, 0)).save(d / f"{imgid}.png")
    cfg, model, ctx = _ctx(fixture_registry, tmp_path, [f"data.image_dir={d}", "data.withhold_images=[test]"])
    provider = make_image_provider(cfg, model, ctx)
    assert provider.cache is not None and not provider.cache.hit
    # every IMGID of every split is in the cache (train copies 0-3, valid and test copy 0)
    assert set(provider.cache.entries) == {f"{t}{c}" for t in range(1, 5) for c in range(4)}
    test_tweets = fixture_registry.spec("dataset", "fixture").loader("test", cfg.data)
    images, mask = provider(test_tweets)  # test ids "10".."40" have files but are withheld
    assert not mask.any()
    train = [tweet("10"), tweet("11"), tweet("12")]
    assert provider(train)[1].tolist() == [False, True, False]  # "10" is a test id too: withheld
    m = ctx.extras["final_metrics"]
    assert (m["images_withheld"], m["images_found"], m["images_missing"]) == (5, 1, 1)
    assert ctx.tags["images"] == "folder" and ctx.tags["image_dir"] == str(d.resolve())
    provider.start_epoch()
    provider([tweet("21")])
    assert provider.end_epoch() > 0 and m["image_load_seconds_epoch1"] > 0

    cfg, model, ctx2 = _ctx(fixture_registry, tmp_path, [f"data.image_dir={d}"])
    again = make_image_provider(cfg, model, ctx2)
    assert again.cache.hit and ctx2.extras["final_metrics"]["image_cache_build_seconds"] == 0.0


def test_withheld_split_must_exist(fixture_registry, tmp_path):
    cfg, model, ctx = _ctx(fixture_registry, tmp_path, ["data.withhold_images=[tst]"])
    with pytest.raises(ConfigError, match="data.withhold_images.*tst"):
        make_image_provider(cfg, model, ctx)


# --------------------------------------------------------------------------- through a whole run


def test_multimodal_run_logs_image_counts_timing_and_random_weights(tmp_path):
    """A test-only aligner that uses images, run by the real trainer on tiny synth data."""
    from torch import nn

    from mner_bench.config import resolve_config
    from mner_bench.hookspecs import hookimpl
    from mner_bench.model import Aligner, AlignerOutput
    from mner_bench.registry import ComponentSpec, MethodSpec, build_registry
    from mner_bench.training import run

    from .conftest import TINY_TEXT

    @dataclass
    class BiasConfig:
        type: str = "image-bias"

    class ImageBias(Aligner):
        uses_images = True

        def __init__(self, text_encoder, visual_encoder):
            super().__init__()
            self.output_size = text_encoder.hidden_size
            self.proj = nn.Linear(visual_encoder.hidden_size, text_encoder.hidden_size)

        def forward(self, batch, text_encoder, visual_encoder):
            assert batch.images.shape[1:] == (3, 32, 32) and batch.image_mask.dtype == torch.bool
            v = visual_encoder(batch.images).mean(1) * batch.image_mask[:, None]  # [B, Hv]
            return AlignerOutput(text_encoder(batch.text) + self.proj(v)[:, None, :])

    seen: dict = {"logged": []}

    class Plugin:
        @hookimpl
        def mner_bench_run_start(self, run):
            seen["tags"] = dict(run.tags)

        @hookimpl
        def mner_bench_log_metrics(self, run, metrics, step):
            seen["logged"].append((step, metrics))

        @hookimpl
        def mner_bench_aligners(self):
            return [ComponentSpec("image-bias", BiasConfig, lambda cfg, text_encoder, visual_encoder=None:
                                  ImageBias(text_encoder, visual_encoder))]

        @hookimpl
        def mner_bench_methods(self):
            return [MethodSpec("imgtest", {"method": "imgtest", "text_encoder": {"type": "hf"},
                                           "visual_encoder": {"type": "clip-vit-b32", "tiny": True},
                                           "aligner": {"type": "image-bias"}, "decoder": {"type": "crf"}})]

    reg = build_registry(extra_plugins=(("imgtest", Plugin()),))
    cfg = resolve_config(reg, "imgtest", None, [
        *TINY_TEXT, "data.dataset=synth-ambiguous", "data.synth.train_size=8", "data.synth.dev_size=4",
        "data.synth.test_size=4", "data.shots=6", "data.withhold_images=[dev]", f"output_dir={tmp_path / 'runs'}",
        "tracking.enabled=false", "train.epochs=2", "train.batch_size=4", "tracking.measure_speed=false",
        "quiet=true"])
    result = run(cfg, reg)
    m = result.metrics
    # 6 training shots + 4 test tweets have images; the 4 dev tweets' images are withheld
    assert (m["images_found"], m["images_missing"], m["images_corrupt"], m["images_withheld"]) == (10, 0, 0, 4)
    assert m["image_load_seconds_epoch1"] > 0 and m["image_load_seconds_total"] >= m["image_load_seconds_epoch1"]
    assert seen["tags"]["visual_weights"] == "random" and seen["tags"]["images"] == "dataset"
    per_epoch = [(step, x["image_load_seconds_epoch"]) for step, x in seen["logged"] if "image_load_seconds_epoch" in x]
    assert [step for step, _ in per_epoch] == [1, 2] and all(v > 0 for _, v in per_epoch)
    assert per_epoch[0][1] == m["image_load_seconds_epoch1"]
    # the Table 7 protocols are scored too, without touching the image counts above
    assert 0.0 <= m["test_f1_empty_image"] <= 1.0 and 0.0 <= m["test_f1_no_image"] <= 1.0


def test_fixed_image_provider_gives_uniform_or_no_images():
    from mner_bench.images import FixedImageProvider, normalise

    tweets = [None, None, None]
    empty, mask = FixedImageProvider(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "empty")(tweets)
    assert empty.shape == (3, 3, 8, 8) and mask.tolist() == [True] * 3
    grey = normalise(np.full((1, 8, 8, 3), 128, dtype=np.uint8), (0.5,) * 3, (0.25,) * 3)[0]
    assert torch.equal(empty[2], grey) and torch.unique(empty).numel() == 1
    none, mask = FixedImageProvider(8, (0.5,) * 3, (0.25,) * 3, "none")(tweets)
    assert mask.tolist() == [False] * 3 and none.abs().sum() == 0


def test_prediction_provider_reads_the_folder_or_the_data_sets_images(image_dir, monkeypatch, caplog):
    from omegaconf import OmegaConf

    from mner_bench.images import make_prediction_image_provider

    monkeypatch.delenv("MNER_BENCH_IMAGES", raising=False)
    model = SimpleNamespace(visual_encoder=FakeEncoder())
    folder = make_prediction_image_provider(OmegaConf.create({"data": {"image_dir": str(image_dir)}}), model)
    assert folder([tweet("good"), tweet("zero")])[1].tolist() == [True, False] and folder.cache is None
    synth = make_prediction_image_provider(OmegaConf.create({"data": {"dataset": "synth-consistent"}}), model)
    assert synth([tweet("synth-consistent-test-00001"), tweet("other")])[1].tolist() == [True, False]
    with caplog.at_level(logging.WARNING, logger="mner_bench.images"):
        none = make_prediction_image_provider(OmegaConf.create({"method": "m", "data": {"dataset": "t15"}}), model)
    assert "NO IMAGES" in caplog.text and not none([tweet("good")])[1].any()


# --------------------------------------------------------------------------- object crops


def test_crops_by_name_and_by_index_with_counts_and_masks(tmp_path, caplog):
    """Crops come from ``<IMGID>_crop<k>`` names (lowest k first) or from an HVPNeT-style index
    (JSON or torch-saved; keys with or without the extension), at most ``max_crops`` per tweet;
    missing, unusable and withheld crops leave masked zero slots and are counted once per tweet."""
    from mner_bench.images import CropSource, load_crop_index

    d = tmp_path / "crops"
    d.mkdir()
    solid((200, 0, 0)).save(d / "a_crop1.png")
    solid((0, 200, 0)).save(d / "a_crop0.jpg")
    solid((0, 0, 200)).save(d / "a_crop2.png")
    solid((9, 9, 9)).save(d / "a_crop3.png")  # beyond max_crops=3
    (d / "b_crop0.jpg").write_text("not an image")
    solid((50, 50, 50)).save(d / "w_crop0.png")
    (d / "a_crop.txt").write_text("ignored")
    by_name = CropSource(d, None, max_crops=3)
    assert [p.name for p in by_name.files("a")] == ["a_crop0.jpg", "a_crop1.png", "a_crop2.png"]
    assert by_name.files("nothing") == []

    provider = ImageProvider(S, MEAN, STD, crops=by_name, withheld={"w"})
    tweets = [tweet("a"), tweet("b"), tweet("c"), tweet("w")]
    with caplog.at_level(logging.WARNING):
        crops, mask = provider.crops(tweets)
        provider.crops(tweets)  # counted once per tweet
    assert crops.shape == (4, 3, 3, S, S)
    assert mask.tolist() == [[True, True, True], [False, False, False], [False] * 3, [False] * 3]
    expected = normalise(np.array(solid((0, 200, 0)).resize((S, S)))[None], MEAN, STD)[0]
    torch.testing.assert_close(crops[0, 0], expected, atol=0.05, rtol=0)  # k=0 first (JPEG: near)
    assert crops[1:].abs().sum() == 0
    assert (provider.metrics["crops_found"], provider.metrics["crops_corrupt"], provider.metrics["crops_missing"]) == (3, 1, 0)
    assert "b_crop0.jpg" in caplog.text

    (tmp_path / "index.json").write_text('{"a.jpg": ["a_crop2.png", "gone.png"], "b": []}')
    index = load_crop_index(tmp_path / "index.json")
    torch.save({"a.jpg": ["a_crop2.png"]}, tmp_path / "index.pth")
    assert load_crop_index(tmp_path / "index.pth") == {"a.jpg": ["a_crop2.png"]}
    listed = ImageProvider(S, MEAN, STD, crops=CropSource(d, index, max_crops=2))
    crops, mask = listed.crops([tweet("a"), tweet("b")])
    assert crops.shape == (2, 2, 3, S, S) and mask.tolist() == [[True, False], [False, False]]
    assert listed.metrics["crops_missing"] == 1 and listed.metrics["crops_found"] == 1
    assert ImageProvider(S, MEAN, STD).crops(tweets) is None


def test_bad_crop_settings_fail_naming_the_key(tmp_path):
    from mner_bench.images import CropSource, load_crop_index

    with pytest.raises(ConfigError, match="data.crop_dir .* does not exist"):
        CropSource.from_config(str(tmp_path / "nope"), None, 3)
    with pytest.raises(ConfigError, match="data.max_crops must be at least 1"):
        CropSource.from_config(str(tmp_path), None, 0)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"bad.json must map IMGIDs"):
        load_crop_index(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text('{"a": "one.png"}')
    with pytest.raises(ConfigError, match=r"entry for 'a' must be a list"):
        load_crop_index(tmp_path / "bad2.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match=r"broken.json cannot be read"):
        load_crop_index(tmp_path / "broken.json")


def test_batcher_carries_crops_into_the_batch(tmp_path):
    from mner_bench.images import CropSource
    from mner_bench.training import Batcher, EncodedSplit

    d = tmp_path / "crops"
    d.mkdir()
    solid((200, 0, 0)).save(d / "a_crop0.png")
    provider = ImageProvider(S, MEAN, STD, crops=CropSource(d, None, max_crops=2))
    from mner_bench.model import EncodedText

    enc = EncodedText(input_ids=[101, 5, 102], word_starts=[1], num_words=1)
    split = EncodedSplit([tweet("a"), tweet("b")], [enc, enc])
    batch = Batcher(0, provider)(split, [0, 1])
    assert batch.crops.shape == (2, 2, 3, S, S) and batch.crop_mask.tolist() == [[True, False], [False, False]]
    assert Batcher(0, provider)(split, [0, 1], images=False).crops is None


@pytest.mark.parametrize("method, extra", [("umt", []), ("bga", ["aligner.crops=2"])])
def test_a_run_reads_object_crops_and_counts_them(tmp_path, method, extra):
    """``mner-bench run umt|bga --crop-dir`` end to end: crops by name for some tweets, counted in
    the run's metrics; the run finishes with finite scores."""
    from mner_bench.cli import main
    from mner_bench.registry import get_registry
    from mner_bench.synth import SynthConfig, generate

    from .conftest import tiny_overrides

    cfg = SynthConfig(train_size=8, dev_size=4, test_size=4)
    crops = tmp_path / "crops"
    crops.mkdir()
    train = generate("ambiguous", "train", cfg)
    for i, t in enumerate(train[:3]):
        solid((40 * i, 100, 200)).save(crops / f"{t.imgid}_crop0.png")
    solid((1, 2, 3)).save(crops / f"{train[0].imgid}_crop1.png")
    get_registry()
    out = tmp_path / "runs"
    rc = main(["run", method, "--dataset", "synth-ambiguous", "--crop-dir", str(crops), "--output-dir", str(out),
               "--epochs", "1", "--quiet", *tiny_overrides(method), *extra, "data.synth.train_size=8", "data.synth.dev_size=4",
               "data.synth.test_size=4", "tracking.enabled=false", "tracking.measure_speed=false", "train.batch_size=4"])
    assert rc == 0
    import json

    m = json.loads(next(out.iterdir()).joinpath("metrics.json").read_text())["metrics"]
    assert (m["crops_found"], m["crops_missing"], m["crops_corrupt"]) == (4, 0, 0)
    assert 0.0 <= m["test_f1"] <= 1.0
