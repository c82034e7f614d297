"""End to end: ``mner-bench run`` on a tiny data set and a tiny model, with a real MLflow store."""

import json

import pytest
from omegaconf import OmegaConf
from seqeval.metrics import f1_score

import mner_bench.registry as registry_module
from mner_bench.cli import main
from mner_bench.config import resolve_config
from mner_bench.data import parse_conll, read_predictions

REQUIRED_METRICS = [
    "test_f1", "test_precision", "test_recall", "test_f1_PER", "test_f1_LOC", "test_f1_ORG", "test_f1_MISC",
    "dev_f1", "params_total", "params_trainable", "params_inference", "latency_ms_b1", "throughput_b32",
]


@pytest.fixture
def use_registry(monkeypatch, fixture_registry):
    monkeypatch.setattr(registry_module, "_REGISTRY", fixture_registry)
    return fixture_registry


def test_run_writes_outputs_and_logs_to_mlflow(tmp_path, use_registry, tiny_run_overrides, capsys):
    rc = main(["run", "bertcrf", "--shots", "8", "--seed", "2", *tiny_run_overrides])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "MLflow run id:" in printed and "output folder:" in printed
    out = tmp_path / "runs" / "bertcrf-fixture-8-2"
    for name in ("config.yaml", "predictions.txt", "metrics.json", "shots.txt", "checkpoints/best.pt"):
        assert (out / name).exists(), name

    # every test word is in predictions.txt, in order
    test = parse_conll((tmp_path / "data" / "fixture" / "test.txt").read_text())
    gold, pred = read_predictions(out / "predictions.txt")
    assert gold == [t.tags for t in test]
    assert [len(p) for p in pred] == [len(t.tokens) for t in test]

    # the F1 of metrics.json is seqeval's F1 of predictions.txt
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["test"]["f1"] - f1_score(gold, pred)) < 1e-9
    assert len((out / "shots.txt").read_text().split()) == 8

    # the run is in the MLflow store with its params, metrics and artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fixture")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "bertcrf-fixture-8-2" and run.info.status == "FINISHED"
    assert run.info.run_id in printed
    for key in REQUIRED_METRICS:
        assert key in run.data.metrics, key
    assert run.data.metrics["test_f1"] == pytest.approx(metrics["test"]["f1"])
    assert run.data.params["train.lr"] == "3e-05" and run.data.params["data.shots"] == "8"
    history = client.get_metric_history(run.info.run_id, "dev_f1")
    assert [m.step for m in history] == [1, 2, 2]  # per epoch, then the selected (best) one
    assert run.data.metrics["dev_f1"] == max(m.value for m in history[:2]) == metrics["dev"]["f1"]
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "predictions.txt", "metrics.json", "shots.txt"} <= artifacts


def test_saved_config_replays_the_run(tmp_path, use_registry, tiny_run_overrides):
    assert main(["run", "bertcrf", "--shots", "8", *tiny_run_overrides, "tracking.enabled=false"]) == 0
    saved = tmp_path / "runs" / "bertcrf-fixture-8-1" / "config.yaml"
    replay = resolve_config(use_registry, "bertcrf", saved)
    assert OmegaConf.to_container(replay) == OmegaConf.to_container(OmegaConf.load(saved))
    # a replay goes to a fresh folder and gives the same scores (same seed, CPU)
    assert main(["run", "bertcrf", "--config", str(saved)]) == 0
    first = json.loads((saved.parent / "metrics.json").read_text())["test"]
    second = json.loads((saved.parent.parent / "bertcrf-fixture-8-1-2" / "metrics.json").read_text())["test"]
    assert first["f1"] == second["f1"] and first["counts"] == second["counts"]


def test_user_errors_exit_2_without_traceback(tmp_path, use_registry, tiny_run_overrides, capsys):
    assert main(["run", "bertcrf", "--shots", "999", *tiny_run_overrides]) == 2
    err = capsys.readouterr().err
    assert "larger than the training set" in err and "Traceback" not in err
    assert main(["run", "bertcrf", "train.nope=1"]) == 2
    assert "unknown key 'train.nope'" in capsys.readouterr().err
    assert main(["run", "bertcfr"]) == 2
    assert "Did you mean 'bertcrf'" in capsys.readouterr().err


def test_list_and_datasets_commands(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "bertcrf" in out and "baselines" in out and "crf" in out
    assert main(["list", "decoderz"]) == 2


def test_unwritable_output_folder_is_a_clear_error(tmp_path, use_registry, tiny_run_overrides, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["run", "bertcrf", *tiny_run_overrides, f"output_dir={blocker / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "output folder" in err and "cannot be created" in err and "Traceback" not in err


def test_debug_flag_shows_the_traceback(use_registry):
    from mner_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="train.nope"):
        main(["--debug", "run", "bertcrf", "train.nope=1"])
