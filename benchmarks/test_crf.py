"""The CRF at batch 32 x 40 words x 9 tags: the core's decoder (pytorch-crf's loss, the batched
Viterbi of :func:`mner_bench.decoders.viterbi_decode`) against pytorch-crf's own calls.

Random emissions, prefix masks of random lengths (the first row full), fixed seed; the loss is
timed with its backward pass, as in training."""

from __future__ import annotations

import pytest
import torch

from mner_bench.decoders import CrfDecoder
from mner_bench.labels import TAGS

B, W = 32, 40


@pytest.fixture(scope="module")
def crf_case():
    gen = torch.Generator().manual_seed(0)
    dec = CrfDecoder(8, len(TAGS))
    emissions = torch.randn(B, W, len(TAGS), generator=gen, requires_grad=True)
    lengths = torch.randint(1, W + 1, (B,), generator=gen)
    lengths[0] = W
    mask = torch.arange(W)[None, :] < lengths[:, None]
    tags = torch.randint(0, len(TAGS), (B, W), generator=gen) * mask
    return dec, emissions, mask, tags


def _info(benchmark, key):
    benchmark.extra_info.update({"key": key, "batch_size": B, "words": W, "tags": len(TAGS)})


@pytest.mark.benchmark(group="crf: loss + backward, 32 x 40")
def test_crf_loss_mner_bench(benchmark, crf_case):
    dec, emissions, mask, tags = crf_case
    _info(benchmark, "crf/loss/mner-bench")

    def loss():
        dec.loss(emissions, tags, mask).backward()

    benchmark(loss)


@pytest.mark.benchmark(group="crf: loss + backward, 32 x 40")
def test_crf_loss_pytorch_crf(benchmark, crf_case):
    dec, emissions, mask, tags = crf_case
    _info(benchmark, "crf/loss/pytorch-crf")

    def loss():
        (-dec.crf(emissions, tags, mask=mask, reduction="mean")).backward()

    benchmark(loss)


@pytest.mark.benchmark(group="crf: Viterbi decode, 32 x 40")
def test_crf_decode_mner_bench(benchmark, crf_case):
    dec, emissions, mask, _ = crf_case
    _info(benchmark, "crf/decode/mner-bench")
    with torch.no_grad():
        out = benchmark(dec.decode, emissions, mask)
    assert out == dec.decode_reference(emissions, mask)


@pytest.mark.benchmark(group="crf: Viterbi decode, 32 x 40")
def test_crf_decode_pytorch_crf(benchmark, crf_case):
    dec, emissions, mask, _ = crf_case
    _info(benchmark, "crf/decode/pytorch-crf")
    with torch.no_grad():
        out = benchmark(dec.crf.decode, emissions, mask)
    assert [len(p) for p in out] == mask.sum(1).tolist()
