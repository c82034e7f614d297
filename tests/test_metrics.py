import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from seqeval.metrics import f1_score, precision_score, recall_score

from mner_bench.data import twitter_loader
from mner_bench.metrics import get_entities, score

from .conftest import requires_real_data


def test_i_after_o_or_other_type_starts_an_entity():
    tags = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG", "I-ORG", "B-PER"]
    assert get_entities(tags) == [("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4), ("ORG", 5, 6), ("PER", 7, 7)]


def test_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "B-MISC"]]
    s = score(gold, pred)
    assert (s.precision, s.recall) == (2 / 4, 2 / 3)
    assert s.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert s.per_type["PER"]["f1"] == 1.0 and s.per_type["LOC"]["f1"] == 0.0
    assert s.counts["ORG"] == {"gold": 1, "predicted": 2, "correct": 1}


TAG = st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"])


def brute_entities(tags):
    """Reference chunker: an entity is a maximal run that starts where conlleval starts one."""
    out = []
    i = 0
    while i < len(tags):
        if tags[i] == "O":
            i += 1
            continue
        etype = tags[i][2:]
        j = i + 1
        while j < len(tags) and tags[j] == f"I-{etype}":
            j += 1
        out.append((etype, i, j - 1))
        i = j
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(TAG, max_size=12))
def test_chunking_matches_brute_force_reference(tags):
    assert get_entities(tags) == brute_entities(tags)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(TAG, TAG), min_size=1, max_size=10), st.integers(0, 3))
def test_scores_match_seqeval_on_random_sequences(pairs, n_more):
    gold = [[g for g, _ in pairs]] * (n_more + 1)
    pred = [[p for _, p in pairs]] * (n_more + 1)
    s = score(gold, pred)
    assert s.f1 == pytest.approx(f1_score(gold, pred), abs=1e-12)
    assert s.precision == pytest.approx(precision_score(gold, pred), abs=1e-12)
    assert s.recall == pytest.approx(recall_score(gold, pred), abs=1e-12)


@requires_real_data
def test_scorer_matches_seqeval_on_the_real_twitter2015_test_split():
    gold = [t.tags for t in twitter_loader("twitter2015")("test")]
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
    pred = [[tg if rng.random() < 0.8 else rng.choice(tags) for tg in seq] for seq in gold]
    s = score(gold, pred)
    assert abs(s.f1 - f1_score(gold, pred)) < 1e-9
    assert abs(s.precision - precision_score(gold, pred)) < 1e-9
    assert abs(s.recall - recall_score(gold, pred)) < 1e-9
    assert score(gold, gold).f1 == 1.0
    assert sum(c["gold"] for c in s.counts.values()) == 5207
