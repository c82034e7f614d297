"""Shared test set-up: tiny models and small fixtures (offline mode and the data folder are set
by the repository's root conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: overrides that shrink the text encoder to hidden 32, 2 layers (random weights, real tokenizer)
TINY_TEXT = [
    "text_encoder.random_init=true",
    "text_encoder.overrides.hidden_size=32",
    "text_encoder.overrides.num_hidden_layers=2",
    "text_encoder.overrides.num_attention_heads=2",
    "text_encoder.overrides.intermediate_size=64",
]

#: per-method overrides added to TINY_TEXT by :func:`tiny_overrides` (a multimodal method
#: shrinks its visual encoder here: every visual encoder has a ``tiny`` test configuration)
TINY_METHOD: dict[str, list[str]] = {
    "bga": ["visual_encoder.tiny=true"],
    "umt": ["visual_encoder.tiny=true"],
}


def tiny_overrides(method: str) -> list[str]:
    """The overrides that make ``method`` tiny: TINY_TEXT plus the method's own ones."""
    return [*TINY_TEXT, *TINY_METHOD.get(method, [])]

FIXTURE_CONLL = """IMGID:1
RT\tO
@user\tO
:\tO
George\tB-PER
Zimmerman\tI-PER
in\tO
Florida\tB-LOC
http://t.co/x\tO

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
with\tO
the\tO
Yankees\tB-ORG

IMGID:4
nothing\tO
here\tO
.\tO
"""


def real_data_dir() -> Path | None:
    d = Path(os.environ.get("MNER_BENCH_DATA", ""))
    return d if (d / "twitter2015" / "test.txt").exists() else None


requires_real_data = pytest.mark.skipif(
    real_data_dir() is None, reason="real Twitter data not found (set MNER_BENCH_DATA)"
)


def make_fixture_dir(root: Path, n_copies: int = 4) -> Path:
    """A tiny data set in the Twitter layout: ``root/fixture/{train,valid,test}.txt``."""
    folder = root / "fixture"
    folder.mkdir(parents=True, exist_ok=True)
    blocks = FIXTURE_CONLL.strip().split("\n\n")
    for name, k in (("train.txt", n_copies), ("valid.txt", 1), ("test.txt", 1)):
        out = []
        for c in range(k):
            for b in blocks:
                head, rest = b.split("\n", 1)
                out.append(f"{head}{c}\n{rest}")
        (folder / name).write_text("\n\n".join(out) + "\n")
    return root


@pytest.fixture
def fixture_registry(tmp_path):
    """The real registry plus a plugin that registers the tiny ``fixture`` data set."""
    from mner_bench.data import twitter_loader
    from mner_bench.hookspecs import hookimpl
    from mner_bench.registry import DatasetSpec, build_registry

    make_fixture_dir(tmp_path / "data")

    class FixturePlugin:
        @hookimpl
        def mner_bench_datasets(self):
            return [DatasetSpec("fixture", twitter_loader("fixture"), "tiny test data")]

    return build_registry(extra_plugins=(("fixture", FixturePlugin()),))


@pytest.fixture
def tiny_run_overrides(tmp_path):
    return [
        *TINY_TEXT,
        f"data.data_dir={tmp_path / 'data'}",
        "data.dataset=fixture",
        f"output_dir={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.epochs=2",
        "train.batch_size=4",
        "tracking.speed_tweets=4",
        "quiet=true",
    ]


@pytest.fixture
def fake_t15(tmp_path, monkeypatch):
    """A data folder whose ``twitter2015/`` holds the tiny fixture, found through
    ``$MNER_BENCH_DATA`` (so that child processes read it too)."""
    root = make_fixture_dir(tmp_path / "data", n_copies=3)
    (root / "fixture").rename(root / "twitter2015")
    monkeypatch.setenv("MNER_BENCH_DATA", str(root))
    return root
