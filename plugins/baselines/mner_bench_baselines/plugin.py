"""The baselines plugin: registers its methods (BERT-CRF, BERT, UMT) and UMT's aligner through
the ``mner_bench`` entry point."""

from __future__ import annotations

from pathlib import Path

from mner_bench.hookspecs import hookimpl
from mner_bench.registry import ComponentSpec, MethodSpec

from .umt import UmtAligner, UmtAlignerConfig

CONFIGS = Path(__file__).parent / "configs"


@hookimpl
def mner_bench_methods():
    return [
        MethodSpec("bertcrf", CONFIGS / "bertcrf.yaml", "BERT-CRF: text encoder, no aligner, CRF"),
        MethodSpec("bert", CONFIGS / "bert.yaml", "BERT: text encoder, no aligner, softmax"),
        MethodSpec("umt", CONFIGS / "umt.yaml", "UMT (Yu et al. 2020): unified multimodal transformer + span detection, CRF",
                   multimodal=True),
    ]


@hookimpl
def mner_bench_aligners():
    return [
        ComponentSpec("umt", UmtAlignerConfig,
                      lambda cfg, text_encoder, visual_encoder=None: UmtAligner(cfg, text_encoder, visual_encoder),
                      "UMT: cross-modal transformer layers, visual gate, entity span detection"),
    ]
