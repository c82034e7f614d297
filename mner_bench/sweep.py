"""``mner-bench sweep``: every (method, shots, seed) combination as a child MLflow run of one
parent run, then a data-efficiency plot and tables logged to the parent.

Each combination runs as its own ``mner-bench run`` process (``--jobs K`` runs K at once; with
several GPUs each process gets one, round-robin, through ``CUDA_VISIBLE_DEVICES``). A sweep is
identified by its settings (methods, data set, shots, seeds, overrides): running the same sweep
again reuses its parent run and skips the combinations that already finished.

On a cluster, run the combinations as independent ``mner-bench run ... tracking.parent_run_id=ID
tracking.tags.sweep_combo=METHOD/SHOTS/SEED`` jobs (a job array, or Ray tasks), all pointing at
one tracking server (``--tracking-uri``); then ``mner-bench sweep ... --collect`` (the same
command with ``--collect``) draws the plot and tables from what they logged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from .errors import MnerBenchError

console = Console(stderr=True)
TYPES = ("PER", "LOC", "ORG", "MISC")


@dataclass(frozen=True)
class Combo:
    method: str
    shots: int | None
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}/{self.shots if self.shots is not None else 'full'}/{self.seed}"


@dataclass
class SweepSpec:
    methods: list[str]
    dataset: str
    shots: list[int | None]
    seeds: list[int]
    overrides: list[str]
    epochs: int | None = None
    data_dir: str | None = None
    output_dir: str = "runs"
    tracking_uri: str | None = None
    device: str | None = None

    @property
    def key(self) -> str:
        ident = json.dumps([self.methods, self.dataset, self.shots, self.seeds, sorted(self.overrides), self.epochs])
        return hashlib.sha1(ident.encode()).hexdigest()[:12]

    def combos(self) -> list[Combo]:
        return [Combo(m, n, s) for m in self.methods for n in self.shots for s in self.seeds]


def _client(uri: str | None):
    from .tracking import connect, resolve_uri

    uri = resolve_uri(uri)
    return connect(uri), uri


def _parent_run(client, spec: SweepSpec):
    from .tracking import _experiment_id

    exp_id = _experiment_id(client, spec.dataset)
    found = client.search_runs([exp_id], filter_string=f"tags.sweep_key = '{spec.key}' and tags.mner_bench_sweep = 'true'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, exp_id
    name = f"sweep-{'+'.join(spec.methods)}-{spec.dataset}"
    run = client.create_run(exp_id, run_name=name, tags={
        "sweep_key": spec.key, "mner_bench_sweep": "true", "dataset": spec.dataset,
        "methods": ",".join(spec.methods),
    })
    client.log_batch(run.info.run_id, params=_sweep_params(spec))
    return run.info.run_id, exp_id


def _sweep_params(spec: SweepSpec):
    from mlflow.entities import Param

    return [Param("methods", ",".join(spec.methods)), Param("shots", ",".join(str(s) for s in spec.shots)),
            Param("seeds", ",".join(map(str, spec.seeds))), Param("overrides", " ".join(spec.overrides)[:6000]),
            Param("epochs", str(spec.epochs))]


def _finished_children(client, exp_id: str, parent: str) -> dict[str, object]:
    runs = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'FINISHED'",
                              max_results=5000)
    return {r.data.tags.get("sweep_combo"): r for r in runs if r.data.tags.get("sweep_combo")}


def _command(spec: SweepSpec, combo: Combo, parent: str, uri: str) -> list[str]:
    cmd = [sys.executable, "-m", "mner_bench.cli", "run", combo.method, "--dataset", spec.dataset,
           "--seed", str(combo.seed), "--quiet", "--tracking-uri", uri, "--output-dir", spec.output_dir]
    if combo.shots is not None:
        cmd += ["--shots", str(combo.shots)]
    if spec.epochs is not None:
        cmd += ["--epochs", str(spec.epochs)]
    if spec.data_dir:
        cmd += ["--data-dir", spec.data_dir]
    if spec.device:
        cmd += ["--device", spec.device]
    # sweeps log no pyfunc model per run unless asked (tracking.log_model=true overrides this)
    return cmd + ["tracking.log_model=false", *spec.overrides] + [f"tracking.parent_run_id={parent}", f"tracking.tags.sweep_combo={combo.key}",
                                         f"tracking.tags.sweep_key={spec.key}"]


def _child_env(slot: int, jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["MNER_BENCH_NUM_THREADS"] = str(threads)
    try:
        import torch

        n_gpu = torch.cuda.device_count()
    except Exception:  # pragma: no cover - torch is a dependency
        n_gpu = 0
    if n_gpu > 1:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % n_gpu)
    return env


def run_sweep(spec: SweepSpec, jobs: int = 1, collect_only: bool = False) -> dict:
    """Run (or resume) the sweep; returns the summary rows and the artifact paths."""
    if jobs < 1:
        raise MnerBenchError(f"--jobs must be at least 1, got {jobs}")
    client, uri = _client(spec.tracking_uri)
    parent, exp_id = _parent_run(client, spec)
    out_dir = Path(spec.output_dir) / f"sweep-{spec.key}"
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    done = _finished_children(client, exp_id, parent)
    todo = [c for c in spec.combos() if c.key not in done]
    console.print(f"sweep {spec.key}: {len(spec.combos())} runs, {len(done)} already finished, {len(todo)} to run "
                  f"(MLflow parent run {parent}, jobs={jobs})")
    failed: list[tuple[Combo, str]] = []
    t_start = time.perf_counter()
    if todo and not collect_only:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                      TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("sweep", total=len(todo))
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(_run_one, spec, c, parent, uri, out_dir, i % jobs, jobs): c
                           for i, c in enumerate(todo)}
                for fut in as_completed(futures):
                    combo = futures[fut]
                    ok, line = fut.result()
                    bar.console.print(("  " if ok else "  [red]FAILED[/] ") + f"{combo.key}: {line}")
                    if not ok:
                        failed.append((combo, line))
                    bar.advance(task)
    wall = time.perf_counter() - t_start
    done = _finished_children(client, exp_id, parent)
    rows = _rows(done)
    artifacts = write_outputs(rows, out_dir, spec.dataset)
    for path in artifacts.values():
        client.log_artifact(parent, str(path))
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric("sweep_wall_seconds", wall, ts, 0), Metric("sweep_runs_finished", len(done), ts, 0)])
    missing = [c.key for c in spec.combos() if c.key not in done]
    client.set_terminated(parent, "FINISHED" if not missing else "FAILED")
    return {"parent_run_id": parent, "rows": rows, "artifacts": artifacts, "failed": failed, "missing": missing,
            "wall_seconds": wall, "output_dir": out_dir}


def _run_one(spec, combo, parent, uri, out_dir, slot, jobs) -> tuple[bool, str]:
    cmd = _command(spec, combo, parent, uri)
    log_path = out_dir / "logs" / (combo.key.replace("/", "_") + ".log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=_child_env(slot, jobs))
        log.write(proc.stdout)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        return False, f"exit {proc.returncode} after {dt:.0f}s: {tail[0]} (log: {log_path})"
    first = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    return True, f"{first} [{dt:.0f}s]"


def _rows(done: dict) -> list[dict]:
    rows = []
    for key, r in sorted(done.items()):
        method, shots, seed = key.split("/")
        m = r.data.metrics
        rows.append({"method": method, "shots": shots, "seed": int(seed), "run_id": r.info.run_id,
                     "test_f1": m.get("test_f1"), "test_precision": m.get("test_precision"),
                     "test_recall": m.get("test_recall"), **{f"test_f1_{t}": m.get(f"test_f1_{t}") for t in TYPES}})
    return rows


def summarise(rows: list[dict], metric: str = "test_f1") -> list[dict]:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None:
            groups[(r["method"], r["shots"])].append(r[metric])
    out = []
    for (method, shots), vals in sorted(groups.items(), key=lambda kv: (kv[0][0], _num(kv[0][1]))):
        out.append({"method": method, "shots": shots, "n_seeds": len(vals), "mean": statistics.fmean(vals),
                    "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0, "min": min(vals), "max": max(vals)})
    return out


def _num(shots: str) -> float:
    return float("inf") if shots == "full" else float(shots)


def write_outputs(rows: list[dict], out_dir: Path, dataset: str) -> dict[str, Path]:
    """``runs.csv`` (one row per run), ``summary.csv`` and ``summary.md`` (mean/std/min/max per
    method and shots) and the plots ``f1_vs_shots.png`` and ``f1_per_type_vs_shots.png``."""
    paths = {"runs_csv": out_dir / "runs.csv", "summary_csv": out_dir / "summary.csv", "summary_md": out_dir / "summary.md"}
    cols = ["method", "shots", "seed", "run_id", "test_f1", "test_precision", "test_recall", *(f"test_f1_{t}" for t in TYPES)]
    with open(paths["runs_csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    summary = summarise(rows)
    with open(paths["summary_csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "shots", "n_seeds", "mean", "std", "min", "max"])
        w.writeheader()
        w.writerows(summary)
    md = [f"Test F1 (%) on {dataset}, mean ± std over seeds [min, max]", "",
          "| method | shots | seeds | F1 | min | max |", "|---|---|---|---|---|---|"]
    md += [f"| {s['method']} | {s['shots']} | {s['n_seeds']} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} | "
           f"{100 * s['min']:.2f} | {100 * s['max']:.2f} |" for s in summary]
    paths["summary_md"].write_text("\n".join(md) + "\n")
    if rows:
        paths["plot"] = out_dir / "f1_vs_shots.png"
        plot_curves(rows, [("test_f1", "overall")], paths["plot"], dataset)
        paths["plot_per_type"] = out_dir / "f1_per_type_vs_shots.png"
        plot_curves(rows, [(f"test_f1_{t}", t) for t in TYPES], paths["plot_per_type"], dataset)
    return paths


def plot_curves(rows: list[dict], panels: list[tuple[str, str]], path: Path, dataset: str) -> None:
    """Test F1 against shots (log x), one line per method: mean over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    shots = sorted({float(r["shots"]) for r in rows if r["shots"] != "full"})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels, strict=True):
        for method in sorted({r["method"] for r in rows}):
            s = [x for x in summarise([r for r in rows if r["method"] == method], metric) if x["shots"] != "full"]
            if not s:
                continue
            xs = [float(x["shots"]) for x in s]
            ax.plot(xs, [100 * x["mean"] for x in s], marker="o", label=method)
            ax.fill_between(xs, [100 * x["min"] for x in s], [100 * x["max"] for x in s], alpha=0.2)
        ax.set_xscale("log")
        ax.set_xticks(shots)  # the swept sizes, as plain numbers (not 5x10^1)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training tweets (shots)")
        ax.set_ylabel("test F1 (%)")
        ax.set_title(f"{dataset}: {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("mean over seeds; band: min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
