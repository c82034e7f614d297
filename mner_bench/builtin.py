"""The core's own plugin: the Hugging Face text encoder, the CRF and softmax decoders, the
text-only aligner and the Twitter2015/2017 data sets. Registered through the entry point
``core`` exactly like any other plugin."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .data import twitter_loader
from .decoders import CrfDecoder, CrfDecoderConfig, SoftmaxDecoder, SoftmaxDecoderConfig
from .encoders import HfTextEncoder, HfTextEncoderConfig
from .hookspecs import hookimpl
from .model import Aligner, AlignerOutput
from .registry import ComponentSpec, DatasetSpec


@dataclass
class TextOnlyAlignerConfig:
    type: str = "none"


class TextOnlyAligner(Aligner):
    """No alignment: the text encoder's last layer goes straight to the decoder."""

    def __init__(self, text_encoder):
        super().__init__()
        self.output_size = text_encoder.hidden_size
        self._noop = nn.Identity()

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


@hookimpl
def mner_bench_datasets():
    return [
        DatasetSpec("twitter2015", twitter_loader("twitter2015"), "Twitter2015 (Zhang et al. 2018; UMT release)",
                    aliases=("t15",), has_images=True),
        DatasetSpec("twitter2017", twitter_loader("twitter2017"), "Twitter2017 (Lu et al. 2018; UMT release)",
                    aliases=("t17",), has_images=True),
    ]
