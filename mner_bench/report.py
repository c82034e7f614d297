"""``mner-bench report``: the paper's Table 2 layout, read from the MLflow store alone.

Rows group finished runs by (method, data set, test data set, shots); each cell is the mean
± standard deviation over seeds (population std; 0 for one seed) in percent.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from dataclasses import dataclass

from .errors import MnerBenchError
from .paper import PARAMS_M, TABLE2

TYPES = ("PER", "LOC", "ORG", "MISC")
COLUMNS = ["method", "dataset", "shots", "seeds", *TYPES, "P", "R", "F1", "params", "params_inf", "latency_ms_b1"]


@dataclass
class RunRow:
    run_id: str
    method: str
    dataset: str
    shots: str
    seed: str
    metrics: dict[str, float]


def collect_runs(client, experiments: list[str] | None = None, run_ids: list[str] | None = None,
                 filter_string: str = "") -> list[RunRow]:
    """Finished runs that have a test F1 (sweep parents are skipped)."""
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        if experiments:
            exps = []
            for name in experiments:
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    names = [e.name for e in client.search_experiments()]
                    raise MnerBenchError(f"no MLflow experiment '{name}'; experiments: {', '.join(names) or '(none)'}")
                exps.append(exp)
        else:
            exps = client.search_experiments()
        flt = "attributes.status = 'FINISHED'"
        if filter_string:
            flt += f" and {filter_string}"
        runs = []
        for exp in exps:
            token = None
            while True:
                page = client.search_runs([exp.experiment_id], filter_string=flt, max_results=1000, page_token=token)
                runs.extend(page)
                token = page.token
                if not token:
                    break
    rows = []
    for r in runs:
        m, p, t = r.data.metrics, r.data.params, r.data.tags
        if "test_f1" not in m or "method" not in t:
            continue
        dataset = t.get("dataset", p.get("data.dataset", "?"))
        if t.get("eval_dataset"):
            dataset = f"{dataset}->{t['eval_dataset']}"
        shots = p.get("data.shots", "None")
        rows.append(RunRow(r.info.run_id, t["method"], dataset, "full" if shots in ("None", "", None) else shots,
                           p.get("seed", "?"), dict(m)))
    return rows


def _ms(values: list[float], scale: float = 100.0) -> str:
    vals = [v * scale for v in values]
    mean = statistics.fmean(vals)
    std = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def _shots_key(s: str):
    return (1, 0) if s == "full" else (0, int(s)) if s.isdigit() else (2, s)


def table_rows(rows: list[RunRow]) -> list[dict[str, str]]:
    groups: dict[tuple, list[RunRow]] = defaultdict(list)
    for r in rows:
        groups[(r.method, r.dataset, r.shots)].append(r)
    out = []
    for (method, dataset, shots), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0], _shots_key(kv[0][2]))):
        def col(key, rs=rs):
            vals = [r.metrics[key] for r in rs if key in r.metrics]
            return _ms(vals) if vals else "-"

        params = [r.metrics["params_total"] for r in rs if "params_total" in r.metrics]
        params_inf = [r.metrics["params_inference"] for r in rs if "params_inference" in r.metrics]
        lat = [r.metrics["latency_ms_b1"] for r in rs if "latency_ms_b1" in r.metrics]
        out.append({
            "method": method, "dataset": dataset, "shots": shots,
            "seeds": ",".join(sorted({r.seed for r in rs}, key=lambda s: (len(s), s))),
            **{t: col(f"test_f1_{t}") for t in TYPES},
            "P": col("test_precision"), "R": col("test_recall"), "F1": col("test_f1"),
            "params": f"{statistics.fmean(params) / 1e6:.1f}M" if params else "-",
            "params_inf": f"{statistics.fmean(params_inf) / 1e6:.1f}M" if params_inf else "-",
            "latency_ms_b1": f"{statistics.fmean(lat):.1f}" if lat else "-",
        })
    return out


def paper_rows(datasets: set[str]) -> list[dict[str, str]]:
    wanted = {d.split("->")[0] for d in datasets} or {"twitter2015", "twitter2017"}
    out = []
    for method, per_ds in TABLE2.items():
        for ds, vals in per_ds.items():
            if ds not in wanted:
                continue
            out.append({
                "method": f"{method} (published)", "dataset": ds, "shots": "full", "seeds": "-",
                **{k: f"{v:.2f}" for k, v in vals.items()},
                "params": f"{PARAMS_M[method]}M" if method in PARAMS_M else "-", "params_inf": "-",
                "latency_ms_b1": "-",
            })
    return out


def render(rows: list[dict[str, str]], fmt: str = "md") -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    if fmt != "md":
        raise MnerBenchError(f"--format must be md or csv, got '{fmt}'")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def build_report(client, experiments=None, run_ids=None, filter_string="", paper=False, fmt="md") -> str:
    runs = collect_runs(client, experiments, run_ids, filter_string)
    if not runs and not paper:
        raise MnerBenchError("no finished runs with test metrics found in the MLflow store")
    rows = table_rows(runs)
    if paper:
        rows += paper_rows({r.dataset for r in runs})
    return render(rows, fmt)
