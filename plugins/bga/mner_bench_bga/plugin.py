"""The BGA-MNER plugin: registers the ``bga`` aligner and the ``bga`` method through the
``mner_bench`` entry point."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mner_bench.errors import ConfigError
from mner_bench.hookspecs import hookimpl
from mner_bench.registry import ComponentSpec, MethodSpec

from .model import BgaAligner, BgaAlignerConfig

CONFIGS = Path(__file__).parent / "configs"


def inference_dims(aligner_cfg) -> tuple[int, int, int]:
    """(width, G_t2v queries, blocks) of the run's visual encoder, read without its weights (the
    queries: its tokens per image times 1 + ``aligner.crops``): the
    architecture is built on the ``meta`` device (no memory, no file read, pretrained off), so
    that image-free inference can build ``G_t2v`` without the visual encoder."""
    from mner_bench.registry import get_registry

    root = aligner_cfg._get_parent() if isinstance(aligner_cfg, DictConfig) else None
    vcfg = root.get("visual_encoder") if root is not None else None
    if vcfg is None:
        raise ConfigError("aligner.type=bga: the run config names no visual_encoder to size the generators from")
    spec = get_registry().spec("visual_encoder", vcfg.type)
    node = OmegaConf.merge(OmegaConf.structured(spec.config_class), vcfg)
    for key, value in (("pretrained", None), ("weights", None), ("require_pretrained", False), ("freeze", False)):
        if key in node:
            node[key] = value
    quiet = logging.getLogger("mner_bench.visual")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # no "random weights" warning for a shape-only build
    try:
        with torch.device("meta"):
            enc = spec.factory(node)
    finally:
        quiet.setLevel(level)
    return enc.hidden_size, enc.num_tokens * (1 + aligner_cfg.crops), len(enc.blocks)


def make_aligner(cfg, text_encoder, visual_encoder=None, inference: bool = False, state=None) -> BgaAligner:
    """The aligner; for image-free inference (``inference=True``, no visual encoder) G_t2v is
    sized from the checkpoint's ``state`` (its learnable queries are ``[N_v, d_v]``), so that a
    loaded model never imports the visual encoder's code; without a state, from the config."""
    dims = None
    if inference and visual_encoder is None and cfg.mcg:
        queries = (state or {}).get("aligner.g_t2v.queries")
        dims = (queries.shape[1], queries.shape[0], None) if queries is not None else inference_dims(cfg)
    return BgaAligner(cfg, text_encoder, visual_encoder, dims)


@hookimpl
def mner_bench_aligners():
    return [ComponentSpec("bga", BgaAlignerConfig, make_aligner,
                          "BGA-MNER: bidirectional generative alignment (SCS + MCG), image-free inference",
                          text_only_inference=lambda cfg: not cfg.mcg or cfg.inference_visual == "generated")]


@hookimpl
def mner_bench_methods():
    return [MethodSpec("bga", CONFIGS / "bga.yaml",
                       "BGA-MNER: MiniLM + CLIP ViT-B/32, BGA layers, CRF; no image needed at inference",
                       multimodal=True)]
