"""The batched Viterbi decoder (mner_bench.decoders.viterbi_decode) against pytorch-crf's own."""

import pytest
import torch

from mner_bench.decoders import CrfDecoder, viterbi_decode


def _random_case(gen: torch.Generator, batch: int, words: int, tags: int, integer: bool):
    """A decoder with random CRF scores, emissions and prefix masks (every row at least one word).
    ``integer=True`` draws small integers, so that many paths tie."""
    dec = CrfDecoder(4, tags)

    def draw(*shape):
        if integer:
            return torch.randint(-2, 3, shape, generator=gen).float()
        return torch.randn(shape, generator=gen)

    with torch.no_grad():
        dec.crf.transitions.copy_(draw(tags, tags))
        dec.crf.start_transitions.copy_(draw(tags))
        dec.crf.end_transitions.copy_(draw(tags))
    emissions = draw(batch, words, tags)
    lengths = torch.randint(1, words + 1, (batch,), generator=gen)
    lengths[0] = words  # the longest row fills the batch, as in a collated batch
    mask = torch.arange(words)[None, :] < lengths[:, None]
    return dec, emissions, mask


@pytest.mark.parametrize("integer", [False, True], ids=["random", "ties"])
def test_batched_viterbi_equals_pytorch_crf(integer):
    gen = torch.Generator().manual_seed(7)
    cases = [(1, 1, 9), (1, 5, 2), (3, 1, 4), (32, 40, 9), (7, 13, 5)]
    cases += [tuple(int(x) for x in torch.randint(1, 12, (3,), generator=gen)) for _ in range(40)]
    for batch, words, tags in cases:
        dec, emissions, mask = _random_case(gen, batch, words, tags, integer)
        got = dec.decode(emissions, mask)
        want = dec.decode_reference(emissions, mask)
        assert got == want, (batch, words, tags)
        assert [len(p) for p in got] == mask.sum(1).tolist()


def test_batched_viterbi_accepts_uint8_masks_and_parameters_with_gradients():
    gen = torch.Generator().manual_seed(3)
    dec, emissions, mask = _random_case(gen, 5, 6, 9, integer=False)
    got = viterbi_decode(emissions, mask.to(torch.uint8), dec.crf.start_transitions, dec.crf.transitions,
                         dec.crf.end_transitions)
    assert got == dec.decode_reference(emissions, mask)


def test_batched_viterbi_hand_made_path():
    # two tags; transitions forbid 0 -> 1, so the best path cannot switch from 0 to 1
    start = torch.tensor([0.0, 0.0])
    end = torch.tensor([0.0, 0.0])
    transitions = torch.tensor([[0.0, -100.0], [0.0, 0.0]])
    emissions = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.0, 3.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # 0,1,1 is forbidden (-100); 1,1,1 scores 5 and beats 0,0,0 (1)
    assert viterbi_decode(emissions, mask, start, transitions, end) == [[1, 1, 1]]
    assert viterbi_decode(emissions[:, :1], mask[:, :1], start, transitions, end) == [[0]]


def test_batched_viterbi_rejects_a_masked_first_word_and_mismatched_shapes():
    dec = CrfDecoder(4, 3)
    emissions = torch.randn(2, 4, 3)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 0] = False
    with pytest.raises(ValueError, match="first word"):
        dec.decode(emissions, mask)
    with pytest.raises(ValueError, match="do not match"):
        dec.decode(emissions, torch.ones(2, 3, dtype=torch.bool))
    assert dec.decode(torch.randn(0, 4, 3), torch.ones(0, 4, dtype=torch.bool)) == []
