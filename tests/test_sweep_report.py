"""``mner-bench sweep`` (child processes, parent MLflow run, resume, plot) and ``report``."""

import csv

import pytest

from mner_bench.cli import main
from mner_bench.report import build_report, render, table_rows

from .conftest import TINY_TEXT


def test_sweep_runs_children_resumes_and_reports(tmp_path, fake_t15, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["sweep", "bertcrf,bert", "--dataset", "t15", "--shots", "4", "--seeds", "1", "--epochs", "1",
            "--jobs", "2", "--tracking-uri", uri, "--output-dir", str(tmp_path / "runs"), *TINY_TEXT,
            "tracking.measure_speed=false", "train.batch_size=4"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "2 to run" in out.err
    folder = next((tmp_path / "runs").glob("sweep-*"))
    with open(folder / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["method"], r["shots"]) for r in rows) == [("bert", "4"), ("bertcrf", "4")]
    assert all(0.0 <= float(r["test_f1"]) <= 1.0 for r in rows)
    assert (folder / "f1_vs_shots.png").stat().st_size > 1000
    assert "| bertcrf | 4 | 1 |" in (folder / "summary.md").read_text()

    # the same sweep again: everything is already there, nothing runs
    assert main(args) == 0
    assert "2 already finished, 0 to run" in capsys.readouterr().err

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("twitter2015")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mner_bench_sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"f1_vs_shots.png", "summary.md", "runs.csv"}

    # report reads the store alone
    assert main(["report", "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    lines = [ln for ln in table.splitlines() if ln.startswith("| bert")]
    assert len(lines) == 2 and "twitter2015" in lines[0]
    assert main(["report", "--tracking-uri", uri, "--paper", "--format", "csv"]) == 0
    csv_out = capsys.readouterr().out
    assert "BGA-MNER (published),twitter2015,full,-,86.80" in csv_out and "bertcrf,twitter2015,4" in csv_out


def test_report_groups_seeds_with_mean_and_std():
    from mner_bench.report import RunRow

    sizes = {"params_total": 130.4e6, "params_inference": 33.6e6}
    rows = [RunRow("a", "bga", "twitter2015", "50", "1", {"test_f1": 0.5, "test_precision": 0.4, "test_recall": 0.6, **sizes}),
            RunRow("b", "bga", "twitter2015", "50", "2", {"test_f1": 0.7, "test_precision": 0.6, "test_recall": 0.8, **sizes})]
    (row,) = table_rows(rows)
    assert row["F1"] == "60.00 ± 10.00" and row["seeds"] == "1,2" and row["PER"] == "-"
    assert (row["params"], row["params_inf"], row["latency_ms_b1"]) == ("130.4M", "33.6M", "-")
    assert "| bga | twitter2015 | 50 | 1,2 |" in render([row])


def test_report_on_an_empty_store_says_so(tmp_path):
    from mlflow.tracking import MlflowClient

    from mner_bench.errors import MnerBenchError

    with pytest.raises(MnerBenchError, match="no finished runs"):
        build_report(MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'empty.db'}"))
