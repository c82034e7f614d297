"""The generated grounding data sets ``synth-ambiguous`` / ``synth-consistent``."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from mner_bench.cli import main
from mner_bench.config import resolve_config
from mner_bench.data import ENTITY_TYPES, sample_shots
from mner_bench.errors import ConfigError
from mner_bench.images import ImageDirectory, ImageProvider
from mner_bench.registry import get_registry
from mner_bench.synth import TYPE_STYLE, SynthConfig, generate, render_image, synth_image_loader

from .conftest import requires_real_data


def name_types(tweets) -> dict[str, set[str]]:
    """Each entity's words -> the types it was tagged with."""
    out: dict[str, set[str]] = defaultdict(set)
    for t in tweets:
        words, etype = [], None
        for tok, tag in zip(t.tokens, t.tags, strict=True):
            if tag.startswith("B-"):
                words, etype = [tok], tag[2:]
            elif tag.startswith("I-"):
                words.append(tok)
        assert etype is not None, "every synth tweet has one entity"
        out[" ".join(words)].add(etype)
    return out


def test_same_seed_same_data_other_seed_other_data():
    a = generate("ambiguous", "train", SynthConfig())
    b = generate("ambiguous", "train", SynthConfig())
    c = generate("ambiguous", "train", SynthConfig(seed=1))
    assert [(t.imgid, t.tokens, t.tags) for t in a] == [(t.imgid, t.tokens, t.tags) for t in b]
    assert [t.tokens for t in a] != [t.tokens for t in c]
    assert len(a) == 200 and len(generate("consistent", "test", SynthConfig(test_size=7))) == 7
    assert len({t.imgid for s in ("train", "dev", "test") for t in generate("ambiguous", s, SynthConfig())}) == 500


def test_ambiguous_names_take_every_type_consistent_names_one():
    amb = name_types(generate("ambiguous", "train", SynthConfig()))
    con = name_types(generate("consistent", "train", SynthConfig()))
    assert all(types == set(ENTITY_TYPES) for types in amb.values())  # text cannot tell the type
    assert all(len(types) == 1 for types in con.values())
    assert set(amb) == set(con) and len(amb) == 24  # same names, same templates
    # consistent: test names were seen in training with the same type
    test = name_types(generate("consistent", "test", SynthConfig()))
    assert all(con[n] == types for n, types in test.items())
    # every type is used about equally (exactly when the size is a multiple of 4 x num_names)
    counts = [sum(t.image_label == e for t in generate("ambiguous", "train", SynthConfig())) for e in ENTITY_TYPES]
    assert sum(counts) == 200 and max(counts) - min(counts) <= 4
    exact = generate("ambiguous", "train", SynthConfig(train_size=192))
    assert all(len([t for t in exact if t.image_label == e]) == 48 for e in ENTITY_TYPES)


def test_registered_with_the_run_config_and_shots():
    reg = get_registry()
    cfg = resolve_config(reg, "bertcrf", None, ["data.dataset=synth-ambiguous", "data.synth.train_size=30",
                                                "data.synth.seed=3", "data.shots=10"])
    spec = reg.spec("dataset", "synth-ambiguous")
    train = spec.loader("train", cfg.data)
    assert len(train) == 30 and train[0].imgid == "synth-ambiguous-train-00000"
    assert [t.tokens for t in train] == [t.tokens for t in generate("ambiguous", "train", SynthConfig(seed=3, train_size=30))]
    shots = sample_shots(train, cfg.data.shots, cfg.seed)
    assert len(shots) == 10 and shots == sample_shots(train, 10, cfg.seed)
    assert spec.image_loader is not None and spec.has_images
    with pytest.raises(ConfigError, match="data.synth.dev_size"):
        spec.loader("dev", resolve_config(reg, "bertcrf", None, ["data.synth.dev_size=0"]).data)


def _type_by_colour(arr: np.ndarray) -> str:
    """Nearest type colour to the mean of the image's saturated pixels."""
    px = arr.reshape(-1, 3).astype(float)
    sat = px.max(1) - px.min(1)
    mean = px[sat > 80].mean(0)
    return min(TYPE_STYLE, key=lambda t: np.linalg.norm(mean - np.array(TYPE_STYLE[t][0])))


def test_images_encode_the_type_and_are_deterministic():
    cfg = SynthConfig(dev_size=100)
    load = synth_image_loader("ambiguous")(None)
    tweets = generate("ambiguous", "dev", cfg)
    first = load(tweets[0].imgid)
    assert first.size == (64, 64) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(load(tweets[0].imgid)))
    assert not np.array_equal(np.asarray(first), np.asarray(load(tweets[1].imgid)))
    assert load("not-a-synth-id") is None
    got = [_type_by_colour(np.asarray(load(t.imgid))) for t in tweets]
    assert got == [t.image_label for t in tweets]  # a colour rule alone separates the types
    # no two images are pixel-identical, even of the same type
    same = [np.asarray(load(t.imgid)) for t in tweets if t.image_label == "PER"][:2]
    assert not np.array_equal(*same)
    assert np.asarray(render_image(None, "k")).std() < np.asarray(render_image("PER", "k")).std()


def test_consistent_images_are_one_picture_per_name():
    """synth-consistent: a name's tweets share one image (its type's shape, its own jitter);
    different names have different images, across splits too."""
    from mner_bench.synth import entity_words

    load = synth_image_loader("consistent")(None)
    cfg = SynthConfig()
    tweets = generate("consistent", "train", cfg) + generate("consistent", "test", cfg)
    pictures: dict[tuple[str, ...], np.ndarray] = {}
    for t in tweets:
        arr = np.asarray(load(t.imgid))
        assert _type_by_colour(arr) == t.image_label
        name = entity_words(t)
        if name in pictures:
            assert np.array_equal(arr, pictures[name]), f"{t.imgid}: another picture of {name}"
        pictures[name] = arr
    assert len(pictures) == cfg.num_names  # every name occurs, each with one picture
    distinct = {arr.tobytes() for arr in pictures.values()}
    assert len(distinct) == cfg.num_names


def test_provider_serves_synth_images_in_memory():
    tweets = generate("consistent", "test", SynthConfig(test_size=6))
    metrics: dict = {}
    provider = ImageProvider(32, (0.5,) * 3, (0.5,) * 3, loader=synth_image_loader("consistent")(None), metrics=metrics)
    images, mask = provider(tweets)
    assert mask.all() and images.shape == (6, 3, 32, 32) and metrics["images_found"] == 6


def test_make_images_writes_a_folder_the_provider_reads(tmp_path, capsys):
    out = tmp_path / "imgs"
    assert main(["make-images", "--dataset", "synth-ambiguous", "--out", str(out), "--splits", "dev", "--size", "32"]) == 0
    assert "dev 100" in capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 100 and files[0] == "synth-ambiguous-dev-00000.jpg"
    tweets = generate("ambiguous", "dev", SynthConfig())
    provider = ImageProvider(32, (0.0,) * 3, (1 / 255,) * 3, directory=ImageDirectory(out))
    images, mask = provider(tweets[:20])
    assert mask.all()
    got = [_type_by_colour(images[b].permute(1, 2, 0).numpy()) for b in range(20)]
    assert got == [t.image_label for t in tweets[:20]]  # the same images, through JPEG


@requires_real_data
def test_make_images_for_twitter_follows_the_shots_draw(tmp_path):
    out = tmp_path / "t15"
    assert main(["make-images", "--dataset", "t15", "--out", str(out), "--splits", "train", "--shots", "5",
                 "--seed", "2"]) == 0
    train = get_registry().spec("dataset", "t15").loader("train", None)
    want = {f"{t.imgid}.jpg" for t in sample_shots(train, 5, 2)}
    assert {p.name for p in out.iterdir()} == want
