"""The core's own plugin: the Hugging Face text encoder, the visual encoders (CLIP ViT-B/32,
ResNet-152), the CRF and softmax decoders, the text-only aligner, the Twitter2015/2017 data
sets and the generated ``synth-*`` sets, and the per-epoch image-loading time. Registered
through the entry point ``core`` exactly like any other plugin."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .data import twitter_loader
from .decoders import CrfDecoder, CrfDecoderConfig, SoftmaxDecoder, SoftmaxDecoderConfig
from .encoders import HfTextEncoder, HfTextEncoderConfig
from .hookspecs import hookimpl
from .model import Aligner, AlignerOutput
from .registry import ComponentSpec, DatasetSpec
from .synth import synth_image_loader, synth_loader
from .visual import ClipVitConfig, ClipVitEncoder, ResNetConfig, ResNetEncoder

log = logging.getLogger(__name__)


@dataclass
class TextOnlyAlignerConfig:
    type: str = "none"


class TextOnlyAligner(Aligner):
    """No alignment: the text encoder's last layer goes straight to the decoder."""

    def __init__(self, text_encoder):
        super().__init__()
        self.output_size = text_encoder.hidden_size

    def forward(self, batch, text_encoder, visual_encoder=None) -> AlignerOutput:
        return AlignerOutput(hidden=text_encoder(batch.text))


@hookimpl
def mner_bench_text_encoders():
    return [ComponentSpec("hf", HfTextEncoderConfig, lambda cfg: HfTextEncoder(cfg),
                          "Hugging Face BERT-style encoder (default all-MiniLM-L6-v2, offline)")]


@hookimpl
def mner_bench_aligners():
    return [ComponentSpec("none", TextOnlyAlignerConfig,
                          lambda cfg, text_encoder, visual_encoder=None: TextOnlyAligner(text_encoder),
                          "no alignment: text only")]


@hookimpl
def mner_bench_decoders():
    return [
        ComponentSpec("crf", CrfDecoderConfig,
                      lambda cfg, input_size, num_tags, **_: CrfDecoder(input_size, num_tags, cfg.dropout),
                      "linear-chain CRF (pytorch-crf)"),
        ComponentSpec("softmax", SoftmaxDecoderConfig,
                      lambda cfg, input_size, num_tags, **_: SoftmaxDecoder(input_size, num_tags, cfg.dropout),
                      "per-word softmax"),
    ]


#: generated data sets are small and easy: fewer epochs keep a CPU run within minutes
SYNTH_RUN_DEFAULTS = {"train": {"epochs": 10}}


@hookimpl
def mner_bench_datasets():
    return [
        DatasetSpec("twitter2015", twitter_loader("twitter2015"), "Twitter2015 (Zhang et al. 2018; UMT release)",
                    aliases=("t15",), has_images=True),
        DatasetSpec("twitter2017", twitter_loader("twitter2017"), "Twitter2017 (Lu et al. 2018; UMT release)",
                    aliases=("t17",), has_images=True),
        DatasetSpec("synth-ambiguous", synth_loader("ambiguous"),
                    "generated: names of every type, only the image tells the type (data.synth.*)",
                    has_images=True, image_loader=synth_image_loader("ambiguous"), run_defaults=SYNTH_RUN_DEFAULTS),
        DatasetSpec("synth-consistent", synth_loader("consistent"),
                    "generated: each name has one type, text alone suffices (data.synth.*)",
                    has_images=True, image_loader=synth_image_loader("consistent"), run_defaults=SYNTH_RUN_DEFAULTS),
    ]


@hookimpl
def mner_bench_visual_encoders():
    return [
        ComponentSpec("clip-vit-b32", ClipVitConfig, lambda cfg: ClipVitEncoder(cfg),
                      "open_clip ViT-B/32: CLS + 49 patch tokens of width 768 (pretrained if cached)"),
        ComponentSpec("resnet152", ResNetConfig, lambda cfg: ResNetEncoder(cfg),
                      "torchvision ResNet-152: 7x7 grid of 2048-d regions (pretrained if cached)"),
    ]


# --------------------------------------------------------------------------- image-loading time


@hookimpl
def mner_bench_epoch_start(run, epoch, num_steps):
    provider = run.extras.get("image_provider")
    if provider is not None:
        provider.start_epoch()


@hookimpl
def mner_bench_epoch_end(run, epoch, metrics):
    """Logs ``image_load_seconds_epoch``: time spent loading images for this epoch's training
    and dev batches (see :mod:`mner_bench.images`)."""
    provider = run.extras.get("image_provider")
    if provider is None:
        return
    seconds = provider.end_epoch()
    log.debug("epoch %d: %.2f s loading images", epoch, seconds)
    run.hook.mner_bench_log_metrics(run=run, metrics={"image_load_seconds_epoch": seconds}, step=epoch)
