"""Contract tests over the registry: every method is built tiny, trained a step and decoded."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mner_bench.config import resolve_config
from mner_bench.decoders import CrfDecoder, SoftmaxDecoder
from mner_bench.labels import TAGS
from mner_bench.registry import get_registry
from mner_bench.training import Batcher, build_model, encode_split

from .conftest import FIXTURE_CONLL, TINY_TEXT, tiny_overrides

METHODS = get_registry().list_components("method")


@pytest.fixture(scope="module")
def tweets():
    from mner_bench.data import parse_conll

    return parse_conll(FIXTURE_CONLL)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_decodes_every_word(method, tweets):
    torch.manual_seed(0)
    cfg = resolve_config(get_registry(), method, None, tiny_overrides(method))
    model = build_model(cfg, get_registry())
    split = encode_split(tweets, model, 128)
    batcher = Batcher(model.text_encoder.tokenizer.pad_token_id, None)
    batch = batcher(split, range(len(tweets)))
    model.train()
    out = model(batch)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.decoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    pred = model.predict(batch)
    assert [len(p) for p in pred] == [len(t.tokens) for t in tweets]
    assert all(0 <= i < len(TAGS) for seq in pred for i in seq)
    counts = model.parameter_counts()
    assert counts["params_total"] >= counts["params_inference"] > 0


def test_words_past_the_length_limit_are_predicted_o_and_counted(tweets):
    cfg = resolve_config(get_registry(), "bertcrf", None, TINY_TEXT)
    model = build_model(cfg, get_registry())
    split = encode_split(tweets, model, 8)  # [CLS] + 6 sub-tokens + [SEP]
    assert split.words_unseen > 0
    batch = Batcher(model.text_encoder.tokenizer.pad_token_id)(split, range(len(tweets)))
    pred = model.eval().predict(batch)
    for seq, enc in zip(pred, split.encoded, strict=True):
        assert len(seq) == enc.num_words
        assert all(t == 0 for t in seq[len(enc.word_starts):])


def _brute_force_best(emissions, transitions, start, end):
    n, k = emissions.shape
    best, arg = -1e9, None
    for path in itertools.product(range(k), repeat=n):
        s = start[path[0]] + emissions[0, path[0]] + end[path[-1]]
        for i in range(1, n):
            s += transitions[path[i - 1], path[i]] + emissions[i, path[i]]
        if s > best:
            best, arg = s, list(path)
    return arg


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4), k=st.integers(2, 4), seed=st.integers(0, 2**31 - 1), lengths=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_crf_viterbi_matches_brute_force(n, k, seed, lengths):
    """Property: on random small cases, Viterbi returns the brute-force best path of each masked prefix."""
    g = torch.Generator().manual_seed(seed)
    dec = CrfDecoder(4, k)
    with torch.no_grad():
        for p in (dec.crf.transitions, dec.crf.start_transitions, dec.crf.end_transitions):
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    lengths = [min(x, n) for x in lengths]
    em = torch.randn(len(lengths), n, k, generator=g) * 2
    mask = torch.tensor([[i < m for i in range(n)] for m in lengths], dtype=torch.bool)
    got = dec.decode(em, mask)
    for b, m in enumerate(lengths):
        want = _brute_force_best(em[b, :m], dec.crf.transitions.detach(), dec.crf.start_transitions.detach(),
                                 dec.crf.end_transitions.detach())
        assert got[b] == want


def test_crf_loss_is_lower_for_the_gold_path_it_was_trained_on():
    torch.manual_seed(0)
    dec = CrfDecoder(4, 3)
    h = torch.randn(2, 5, 4)
    tags = torch.tensor([[0, 1, 2, 0, 0], [2, 2, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    opt = torch.optim.Adam(dec.parameters(), lr=0.1)
    first = None
    for _ in range(50):
        loss = dec.loss(dec.emissions(h), tags, mask)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first / 4
    assert dec.decode(dec.emissions(h), mask) == [[0, 1, 2, 0, 0], [2, 2, 1]]


def test_softmax_decoder_masks_padding():
    dec = SoftmaxDecoder(2, 3)
    em = torch.tensor([[[0.0, 5.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 7.0]]])
    mask = torch.tensor([[True, True, False]])
    assert dec.decode(em, mask) == [[1, 0]]
    loss_masked = dec.loss(em, torch.tensor([[1, 0, 0]]), mask)
    loss_changed_pad = dec.loss(em, torch.tensor([[1, 0, 2]]), mask)
    assert torch.equal(loss_masked, loss_changed_pad)
