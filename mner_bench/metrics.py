"""Entity-level scoring, the way conlleval and seqeval's default mode count.

Chunking rules (conlleval): a chunk starts at ``B-X``, or at ``I-X`` that follows ``O``,
the sentence start, or a tag of another type; it ends before the next ``B``, ``O`` or a tag
of another type. Scores are micro precision/recall/F1 over exact (type, start, end)
matches, overall and per type, on every word given (words the model could not see are
scored as predicted ``O`` by the trainer, never dropped).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .data import ENTITY_TYPES


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Chunks of one tag sequence as ``(type, start, end)`` with ``end`` inclusive."""
    entities: list[tuple[str, int, int]] = []
    cur_type: str | None = None
    start = 0
    for i, tag in enumerate(tags):
        if tag == "O":
            prefix, etype = "O", None
        else:
            prefix, _, etype = tag.partition("-")
        starts = prefix == "B" or (prefix == "I" and etype != cur_type)
        if cur_type is not None and (prefix == "O" or starts):
            entities.append((cur_type, start, i - 1))
            cur_type = None
        if starts:
            cur_type, start = etype, i
    if cur_type is not None:
        entities.append((cur_type, start, len(tags) - 1))
    return entities


@dataclass
class Scores:
    """Micro P/R/F1 overall and per type, with the counts behind them."""

    precision: float
    recall: float
    f1: float
    per_type: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_precision": self.precision, f"{prefix}_recall": self.recall, f"{prefix}_f1": self.f1}
        for etype, s in self.per_type.items():
            out[f"{prefix}_f1_{etype}"] = s["f1"]
        return out


def _prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    p = correct / predicted if predicted else 0.0
    r = correct / gold if gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def score(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], types: Sequence[str] = ENTITY_TYPES) -> Scores:
    """Score predicted tag sequences against gold ones (same number of words each)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sequences but {len(pred)} predicted")
    n_gold: Counter = Counter()
    n_pred: Counter = Counter()
    n_ok: Counter = Counter()
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"sequence {i}: {len(g)} gold tags but {len(p)} predicted")
        ge = set(get_entities(g))
        pe = set(get_entities(p))
        n_gold.update(e[0] for e in ge)
        n_pred.update(e[0] for e in pe)
        n_ok.update(e[0] for e in ge & pe)
    per_type = {}
    counts = {}
    for t in sorted(set(types) | set(n_gold) | set(n_pred)):
        p, r, f = _prf(n_ok[t], n_pred[t], n_gold[t])
        per_type[t] = {"precision": p, "recall": r, "f1": f}
        counts[t] = {"gold": n_gold[t], "predicted": n_pred[t], "correct": n_ok[t]}
    p, r, f = _prf(sum(n_ok.values()), sum(n_pred.values()), sum(n_gold.values()))
    return Scores(p, r, f, per_type, counts)


def count_entities(tag_seqs: Sequence[Sequence[str]]) -> Counter:
    """Entities per type, counted the way :func:`score` counts them."""
    c: Counter = Counter()
    for tags in tag_seqs:
        c.update(e[0] for e in get_entities(tags))
    return c
