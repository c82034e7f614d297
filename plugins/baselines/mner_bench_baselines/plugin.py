"""The baselines plugin: registers its methods through the ``mner_bench`` entry point."""

from __future__ import annotations

from pathlib import Path

from mner_bench.hookspecs import hookimpl
from mner_bench.registry import MethodSpec

CONFIGS = Path(__file__).parent / "configs"


@hookimpl
def mner_bench_methods():
    return [
        MethodSpec("bertcrf", CONFIGS / "bertcrf.yaml", "BERT-CRF: text encoder, no aligner, CRF"),
        MethodSpec("bert", CONFIGS / "bert.yaml", "BERT: text encoder, no aligner, softmax"),
    ]
