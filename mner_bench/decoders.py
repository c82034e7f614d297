"""Tag decoders: a linear-chain CRF (pytorch-crf) and a per-word softmax.

Each keeps scoring (``emissions``), training loss (``loss``) and decoding (``decode``)
separate, so that each can be tested on hand-made tensors.

The CRF's parameters and loss are pytorch-crf's. Its Viterbi decoding is :func:`viterbi_decode`,
a batched version of pytorch-crf's: the same recursion, tensor for tensor, then a backtrace over
the whole batch at once and one copy to the host at the end (pytorch-crf traces back tweet by
tweet and tag by tag with ``.item()``: on a GPU, one device synchronisation per word). It returns
exactly pytorch-crf's paths, ties included (``tests/test_crf.py``, on the CPU);
:meth:`CrfDecoder.decode_reference` keeps pytorch-crf's own decoder as the reference.
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


def viterbi_decode(emissions: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, transitions: torch.Tensor,
                   end: torch.Tensor) -> list[list[int]]:
    """Best tag path of each sequence (batched Viterbi), exactly as ``torchcrf.CRF.decode``.

    :param emissions: ``[B, W, T]`` tag scores.
    :param mask: ``[B, W]`` True on each row's words: a prefix, the first word always on.
    :param start: ``[T]`` start scores; ``transitions``: ``[T, T]`` (from, to); ``end``: ``[T]``.
    :returns: one list of ``mask[b].sum()`` tag ids per row.

    The forward recursion is pytorch-crf's operation for operation (same additions, same
    ``max`` over the same axis, so the same scores and the same tie-breaking); the backtrace
    follows every row's back-pointers at once (one ``gather`` per position) and copies the
    paths to the host once.
    """
    if emissions.dim() != 3 or emissions.shape[:2] != mask.shape or emissions.size(2) != transitions.size(0):
        raise ValueError(f"emissions [B, W, T] and mask [B, W] do not match: {tuple(emissions.shape)} and "
                         f"{tuple(mask.shape)} with {transitions.size(0)} tags")
    B, W, _ = emissions.shape
    if B == 0:
        return []
    mask = mask.bool()
    if W == 0 or not bool(mask[:, 0].all()):
        raise ValueError("mask of the first word must be on for every row (each tweet has a first word)")
    score = start + emissions[:, 0]  # [B, T]: best score of a path ending in each tag
    history = []  # per position i >= 1: [B, T] best previous tag for each tag at i
    for i in range(1, W):
        next_score, indices = (score.unsqueeze(2) + transitions + emissions[:, i].unsqueeze(1)).max(dim=1)
        score = torch.where(mask[:, i].unsqueeze(1), next_score, score)
        history.append(indices)
    score = score + end
    lengths = mask.long().sum(1)
    last = lengths - 1  # each row's last word
    cur = score.max(dim=1).indices  # [B] best last tag
    paths = torch.empty((B, W), dtype=torch.long, device=emissions.device)
    for i in range(W - 1, 0, -1):
        paths[:, i] = cur  # rows whose last word is before i keep their best last tag (cut below)
        prev = history[i - 1].gather(1, cur.unsqueeze(1)).squeeze(1)
        cur = torch.where(last >= i, prev, cur)
    paths[:, 0] = cur
    return [row[:n] for row, n in zip(paths.tolist(), lengths.tolist(), strict=True)]


class CrfDecoder(LinearEmissions):
    """Linear-chain CRF over words: negative log-likelihood loss, Viterbi decoding."""

    def __init__(self, input_size: int, num_tags: int, dropout: float = 0.0):
        super().__init__(input_size, num_tags, dropout)
        self.crf = CRF(num_tags, batch_first=True)

    def loss(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per tweet; ``mask`` must be a non-empty prefix per row."""
        return -self.crf(emissions, tags, mask=mask, reduction="mean")

    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Best path per tweet (:func:`viterbi_decode`; equal to :meth:`decode_reference`)."""
        crf = self.crf
        return viterbi_decode(emissions, mask, crf.start_transitions, crf.transitions, crf.end_transitions)

    def decode_reference(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """pytorch-crf's own Viterbi decoder (the reference :meth:`decode` is tested against)."""
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
