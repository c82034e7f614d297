"""The performance targets of issue 6, as ratios of two benchmarks measured in the same run.

Each benchmark names itself with ``benchmark.extra_info["key"]`` (``inference/bga/b32/cpu``,
...); a target divides the time of one key by that of another. Ratios are taken on the
``min`` of each benchmark's rounds (the round least disturbed by other processes on a shared
machine; pytest-benchmark's default sort column) and, for reference, on the ``median``; the
verdict uses the ``min`` ratio and says when the median ratio disagrees.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Target:
    #: what is compared, in words
    name: str
    #: ``time(numerator) / time(denominator)``
    numerator: str
    denominator: str
    #: ``<=`` or ``>=``, and the bound; None: an informational ratio without a target
    op: str | None = None
    bound: float | None = None


TARGETS: tuple[Target, ...] = (
    Target("bga (image-free) / bertcrf inference time, batch 32", "inference/bga/b32/cpu", "inference/bertcrf/b32/cpu", "<=", 1.15),
    Target("bga (image-free) / bertcrf inference time, batch 1", "inference/bga/b1/cpu", "inference/bertcrf/b1/cpu", "<=", 1.15),
    Target("umt (with images) / bga (image-free) inference time, batch 32", "inference/umt/b32/cpu", "inference/bga/b32/cpu", ">=", 2.0),
    Target("umt (with images) / bga (image-free) inference time, batch 1", "inference/umt/b1/cpu", "inference/bga/b1/cpu", ">=", 2.0),
    Target("bertcrf training epoch: mner-bench / bare loop", "epoch/train/mner-bench", "epoch/train/bare", "<=", 1.1),
    Target("bertcrf evaluation: mner-bench / bare loop", "epoch/eval/mner-bench", "epoch/eval/bare", "<=", 1.1),
    Target("16 images: JPEG decode / image cache", "images/decode", "images/cache", ">=", 5.0),
    # informational: no target
    Target("CRF Viterbi 32x40: pytorch-crf / batched (mner-bench)", "crf/decode/pytorch-crf", "crf/decode/mner-bench"),
    Target("CRF loss 32x40: mner-bench / pytorch-crf", "crf/loss/mner-bench", "crf/loss/pytorch-crf"),
    Target("CRF Viterbi 32x40 (pytorch-crf) / bertcrf inference batch 32", "crf/decode/pytorch-crf", "inference/bertcrf/b32/cpu"),
    Target("collate 16 / bertcrf training step 16", "pipeline/collate", "train-step/bertcrf/cpu"),
    Target("bertcrf on CUDA (bf16) / CPU inference time, batch 32", "inference/bertcrf/b32/cuda", "inference/bertcrf/b32/cpu"),
)

_OPS = {"<=": operator.le, ">=": operator.ge}


@dataclass
class TargetResult:
    name: str
    numerator: str
    denominator: str
    target: str
    ratio_min: float | None = None
    ratio_median: float | None = None
    #: "met", "missed", "info" (no target) or "not measured"
    verdict: str = "not measured"
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(target: Target, stats: dict[str, dict[str, float]]) -> TargetResult:
    """The target's ratios from ``stats`` (key -> {"min": s, "median": s}), with the verdict."""
    res = TargetResult(target.name, target.numerator, target.denominator,
                       f"{target.op} {target.bound:g}" if target.op else "-")
    missing = [k for k in (target.numerator, target.denominator) if k not in stats]
    if missing:
        res.note = f"no result for {', '.join(missing)} (skipped or failed)"
        return res
    num, den = stats[target.numerator], stats[target.denominator]
    res.ratio_min = num["min"] / den["min"]
    res.ratio_median = num["median"] / den["median"]
    if target.op is None:
        res.verdict = "info"
        return res
    ok = _OPS[target.op](res.ratio_min, target.bound)
    res.verdict = "met" if ok else "missed"
    if _OPS[target.op](res.ratio_median, target.bound) != ok:
        res.note = "the median ratio disagrees (noisy machine)"
    return res


def evaluate_all(stats: dict[str, dict[str, float]]) -> list[TargetResult]:
    return [evaluate(t, stats) for t in TARGETS]


def format_table(results: list[TargetResult]) -> str:
    """A plain-text table of the results (printed at the end of a benchmark run)."""
    rows = [("target", "ratio (min)", "ratio (median)", "bound", "verdict")]
    for r in results:
        rows.append((r.name, _fmt(r.ratio_min), _fmt(r.ratio_median), r.target,
                     r.verdict + (f" ({r.note})" if r.note else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _fmt(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.3f}" if ratio >= 0.01 else f"{ratio:.1e}"
