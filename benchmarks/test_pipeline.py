"""The input pipeline and scoring.

* Text, batch of 16 t15 training tweets: tokenise + collate (``HfTextEncoder.tokenize``: the
  MiniLM tokenizer per tweet, then padding), and the trainer's per-step collation of tweets
  tokenised once (``Batcher`` with gold tags, as in training).
* Images, batch of 16: decoding the JPEGs (generated, 512 x 512) each time (PIL decode at a
  reduced DCT scale, bicubic resize, centre crop to 224, normalisation) against reading them
  from the suite's disk cache (memory-mapped uint8, then the same normalisation). "Cold" means
  decoded, not read from disk: the files are in the OS page cache after the first round.
* Scoring the whole t15 test split (3,257 tweets) with :func:`mner_bench.metrics.score`, from
  the tag lists and from a written ``predictions.txt``, and with seqeval's
  ``classification_report`` (the counts it reproduces) for reference.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mner_bench.data import read_predictions, write_conll
from mner_bench.images import ImageDirectory, ImageProvider
from mner_bench.metrics import score
from mner_bench.training import Batcher, encode_split

from .common import config

BATCH = 16


@pytest.fixture(scope="module")
def text_encoder(registry):
    import torch

    cfg = config(registry, "bertcrf", torch.device("cpu"))
    return registry.create_component("text_encoder", cfg.text_encoder.type, cfg.text_encoder), cfg.data.max_length


@pytest.mark.benchmark(group="input pipeline: text, batch of 16")
def test_tokenize_and_collate(benchmark, text_encoder, t15):
    enc, max_length = text_encoder
    words = [t.tokens for t in t15["train"][:BATCH]]
    benchmark.extra_info.update({"key": "pipeline/tokenize+collate", "batch_size": BATCH})
    batch = benchmark(enc.tokenize, words, max_length)
    assert batch.input_ids.shape[0] == BATCH


@pytest.mark.benchmark(group="input pipeline: text, batch of 16")
def test_collate(benchmark, text_encoder, t15):
    enc, max_length = text_encoder
    split = encode_split(t15["train"][:BATCH], SimpleNamespace(text_encoder=enc), max_length)
    batcher = Batcher(enc.tokenizer.pad_token_id)
    benchmark.extra_info.update({"key": "pipeline/collate", "batch_size": BATCH})
    batch = benchmark(batcher, split, range(BATCH))
    assert batch.tags.shape == batch.text.word_starts.shape


def _provider(image_dir, cache=None) -> ImageProvider:
    import open_clip

    return ImageProvider(224, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD,
                         directory=ImageDirectory(image_dir), cache=cache)


@pytest.mark.benchmark(group="input pipeline: 16 images")
def test_images_decode(benchmark, image_dir, t15):
    tweets = t15["train"][:BATCH]
    provider = _provider(image_dir)
    benchmark.extra_info.update({"key": "images/decode", "images": BATCH, "side_on_disk": 512, "side": 224})
    images, mask = benchmark(provider, tweets)
    assert images.shape == (BATCH, 3, 224, 224) and bool(mask.all())


@pytest.mark.benchmark(group="input pipeline: 16 images")
def test_images_cache(benchmark, image_dir, image_cache, t15):
    tweets = t15["train"][:BATCH]
    provider = _provider(image_dir, image_cache)
    benchmark.extra_info.update({"key": "images/cache", "images": BATCH, "side_on_disk": 512, "side": 224})
    images, mask = benchmark(provider, tweets)
    assert images.shape == (BATCH, 3, 224, 224) and bool(mask.all())
    assert images.equal(_provider(image_dir)(tweets)[0])  # the same pixels as decoding


@pytest.fixture(scope="module")
def test_predictions(t15, tmp_path_factory):
    """Gold tags of t15 test and a deterministic, imperfect prediction of them: every third
    tweet's entities dropped, every fifth tweet's first entity given another type."""
    tweets = t15["test"]
    gold = [t.tags for t in tweets]
    pred = []
    for i, tags in enumerate(gold):
        p = list(tags)
        if i % 3 == 0:
            p = ["O"] * len(p)
        elif i % 5 == 0:
            for j, tag in enumerate(p):
                if tag.startswith("B-"):
                    p[j] = "B-ORG" if tag != "B-ORG" else "B-PER"
                    break
        pred.append(p)
    path = tmp_path_factory.mktemp("scoring") / "predictions.txt"
    write_conll(tweets, path, pred)
    return gold, pred, path


@pytest.mark.benchmark(group="scoring: t15 test (3,257 tweets)")
def test_score(benchmark, test_predictions):
    gold, pred, _ = test_predictions
    benchmark.extra_info.update({"key": "scoring/mner-bench", "tweets": len(gold)})
    s = benchmark(score, gold, pred)
    assert 0.0 < s.f1 < 1.0


@pytest.mark.benchmark(group="scoring: t15 test (3,257 tweets)")
def test_score_from_file(benchmark, test_predictions):
    gold, _, path = test_predictions
    benchmark.extra_info.update({"key": "scoring/mner-bench-from-file", "tweets": len(gold)})
    s = benchmark(lambda: score(*read_predictions(path)))
    assert s == score(*test_predictions[:2])


@pytest.mark.benchmark(group="scoring: t15 test (3,257 tweets)")
def test_score_seqeval(benchmark, test_predictions):
    from seqeval.metrics import classification_report

    gold, pred, _ = test_predictions
    benchmark.extra_info.update({"key": "scoring/seqeval", "tweets": len(gold)})
    report = benchmark(classification_report, gold, pred, output_dict=True, zero_division=0)
    assert report["micro avg"]["f1-score"] == pytest.approx(score(gold, pred).f1, abs=1e-12)
