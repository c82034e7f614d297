"""Tag decoders: a linear-chain CRF (pytorch-crf) and a per-word softmax.

Each keeps scoring (``emissions``), training loss (``loss``) and decoding (``decode``)
separate, so that each can be tested on hand-made tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torchcrf import CRF

from .model import Decoder


@dataclass
class CrfDecoderConfig:
    type: str = "crf"
    #: dropout on the word states before the tag projection
    dropout: float = 0.0


@dataclass
class SoftmaxDecoderConfig:
    type: str = "softmax"
    dropout: float = 0.0


class LinearEmissions(Decoder):
    """Shared part: dropout then a linear map from word states to tag scores."""

    def __init__(self, input_size: int, num_tags: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(input_size, num_tags)
        self.num_tags = num_tags

    def emissions(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout(hidden))


class CrfDecoder(LinearEmissions):
    """Linear-chain CRF over words: negative log-likelihood loss, Viterbi decoding."""

    def __init__(self, input_size: int, num_tags: int, dropout: float = 0.0):
        super().__init__(input_size, num_tags, dropout)
        self.crf = CRF(num_tags, batch_first=True)

    def loss(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per tweet; ``mask`` must be a non-empty prefix per row."""
        return -self.crf(emissions, tags, mask=mask, reduction="mean")

    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        return self.crf.decode(emissions, mask=mask)


class SoftmaxDecoder(LinearEmissions):
    """Independent per-word softmax (the 'BERT' baseline)."""

    def loss(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token cross-entropy summed per tweet, averaged over tweets (same scale as the CRF)."""
        ce = F.cross_entropy(emissions.transpose(1, 2), tags, reduction="none")
        return (ce * mask).sum() / emissions.size(0)

    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        best = emissions.argmax(-1)
        lengths = mask.sum(1).tolist()
        return [best[b, :n].tolist() for b, n in enumerate(lengths)]
