"""Interruption and resume, NaN losses, concurrent runs, an unreachable tracking server."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import mner_bench.registry as registry_module
from mner_bench.cli import main

from .conftest import TINY_TEXT


def _opts(tmp_path, runs="runs"):
    return ["--dataset", "t15", "--epochs", "4", "--seed", "3", "--output-dir", str(tmp_path / runs), "--quiet",
            *TINY_TEXT, "train.batch_size=4", "tracking.measure_speed=false"]


KILLER_TEMPLATE = textwrap.dedent("""
    import os, signal, sys
    from mner_bench.cli import main
    from mner_bench.hookspecs import hookimpl
    import mner_bench.registry as r

    class Killer:
        @hookimpl
        def mner_bench_epoch_end(self, run, epoch):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGNAL)

    r._REGISTRY = r.build_registry(extra_plugins=(("killer", Killer()),))
    sys.exit(main(sys.argv[1:]))
""")
KILLER = KILLER_TEMPLATE.replace("SIGNAL", "SIGKILL")


def test_sigkill_after_epoch_2_then_resume_equals_an_uninterrupted_run(tmp_path, fake_t15, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed = subprocess.run([sys.executable, "-c", KILLER, "run", "bertcrf", *_opts(tmp_path, "killed"),
                             "--tracking-uri", uri], capture_output=True, text=True, env=dict(os.environ))
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = next((tmp_path / "killed").iterdir())
    assert len((folder / "history.jsonl").read_text().splitlines()) == 2
    assert (folder / "checkpoints" / "last.pt").exists() and not (folder / "predictions.txt").exists()

    assert main(["run", "--resume", str(folder), "--tracking-uri", uri]) == 0
    assert main(["run", "bertcrf", *_opts(tmp_path, "straight"), "--tracking-uri", uri]) == 0
    straight = next((tmp_path / "straight").iterdir())

    assert (folder / "predictions.txt").read_text() == (straight / "predictions.txt").read_text()
    m1 = json.loads((folder / "metrics.json").read_text())
    m2 = json.loads((straight / "metrics.json").read_text())
    assert m1["test"] == m2["test"] and m1["dev"] == m2["dev"]
    assert (folder / "history.jsonl").read_text() == (straight / "history.jsonl").read_text()
    assert not (folder / "checkpoints" / "last.pt").exists()  # finished runs keep best.pt only

    # the resumed run continued the same MLflow run: one run, finished, with 4 epochs of dev_f1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("twitter2015")
    runs = {r.data.tags["output_dir"]: r for r in client.search_runs([exp.experiment_id])}
    resumed = runs[str(folder.resolve())]
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed_from_epoch"] == "2"
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "dev_f1")]
    assert steps[:4] == [1, 2, 3, 4]
    assert resumed.data.metrics["test_f1"] == pytest.approx(m1["test"]["f1"])


def test_resume_of_a_finished_run_says_there_is_nothing_to_resume(tmp_path, fake_t15, capsys):
    assert main(["run", "bertcrf", *_opts(tmp_path), "tracking.enabled=false", "--epochs", "1"]) == 0
    folder = next((tmp_path / "runs").iterdir())
    assert main(["run", "--resume", str(folder)]) == 2
    assert "no checkpoints/last.pt" in capsys.readouterr().err


def test_nan_loss_stops_marks_failed_and_keeps_the_last_good_checkpoint(tmp_path, fake_t15, monkeypatch, capsys):
    import torch

    from mner_bench.decoders import CrfDecoder

    calls = {"n": 0}
    real = CrfDecoder.loss

    def flaky(self, emissions, tags, mask):
        calls["n"] += 1
        loss = real(self, emissions, tags, mask)
        return loss * torch.tensor(float("nan")) if calls["n"] > 3 else loss  # 3 steps = epoch 1

    monkeypatch.setattr(CrfDecoder, "loss", flaky)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", "bertcrf", *_opts(tmp_path), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "training loss became nan at epoch 2, step 1" in err and "Traceback" not in err
    folder = next((tmp_path / "runs").iterdir())
    ckpt = torch.load(folder / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["state"]["epoch"] == 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("twitter2015").experiment_id])
    assert run.info.status == "FAILED" and "nan" in run.data.tags["error"]


def test_two_concurrent_runs_on_the_default_store_both_complete(tmp_path, fake_t15):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [subprocess.Popen([sys.executable, "-m", "mner_bench.cli", "run", "bertcrf", *_opts(tmp_path),
                               "--seed", str(seed), "--epochs", "2"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("twitter2015").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["bertcrf-twitter2015-full-1", "bertcrf-twitter2015-full-2"], [
        o[1][-3000:] for o in outs]
    for r in runs:
        assert r.info.status == "FINISHED" and "test_f1" in r.data.metrics
        assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 2
        assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"predictions.txt", "metrics.json"}


def test_unreachable_tracking_server_trains_anyway_and_logs_later(tmp_path, fake_t15, capsys):
    assert main(["run", "bertcrf", *_opts(tmp_path), "--epochs", "2", "--tracking-uri", "http://127.0.0.1:9"]) == 0
    folder = next((tmp_path / "runs").iterdir())
    assert (folder / "predictions.txt").exists() and (folder / "tracking_pending.txt").exists()
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot be reached" in err and "mner-bench log-run" in err

    uri = f"sqlite:///{tmp_path / 'later.db'}"
    assert main(["log-run", str(folder), "--tracking-uri", uri]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("twitter2015").experiment_id])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert run.info.status == "FINISHED" and run.data.metrics["test_f1"] == pytest.approx(metrics["test"]["f1"])
    assert len(client.get_metric_history(run.info.run_id, "dev_f1")) == 3  # 2 epochs + final
    assert not (folder / "tracking_pending.txt").exists()


def test_keep_last_keeps_the_last_epochs_checkpoint(tmp_path, fake_t15):
    import torch

    assert main(["run", "bertcrf", *_opts(tmp_path), "--epochs", "2", "train.keep_last=true",
                 "tracking.enabled=false"]) == 0
    folder = next((tmp_path / "runs").iterdir())
    ckpt = torch.load(folder / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["state"]["epoch"] == 2 and (folder / "checkpoints" / "best.pt").exists()


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", None)


def test_sigterm_marks_the_mlflow_run_killed_and_keeps_the_checkpoint(tmp_path, fake_t15):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-c", KILLER_TEMPLATE.replace("SIGNAL", "SIGTERM"), "run", "bertcrf",
                           *_opts(tmp_path), "--tracking-uri", uri], capture_output=True, text=True)
    assert proc.returncode == 130 and "interrupted" in proc.stderr
    folder = next((tmp_path / "runs").iterdir())
    assert (folder / "checkpoints" / "last.pt").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("twitter2015").experiment_id])
    assert run.info.status == "KILLED"
