"""``mner-bench predict`` and the run's MLflow pyfunc model (loaded in-process and served)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import mner_bench.registry as registry_module
from mner_bench.cli import main
from mner_bench.data import read_predictions
from mner_bench.predict import entity_spans, read_inputs, tokenize_tweet


@pytest.mark.parametrize("text, words", [
    ("RT @JayKenMinaj: Me outside of where George Zimmerman got shot at. http://t.co/Z3neVBQ7vF",
     ["RT", "@JayKenMinaj", ":", "Me", "outside", "of", "where", "George", "Zimmerman", "got", "shot", "at", ".",
      "http://t.co/Z3neVBQ7vF"]),
    ("I've class at 7:30pm #NWM7 &amp; more...", ["I", "'", "ve", "class", "at", "7", ":", "30pm", "#NWM7", "&amp",
                                                  ";", "more", ".", ".", "."]),
    ("Zürich ⚾ café", ["Zürich", "⚾", "café"]),
])
def test_tweet_tokenizer_splits_like_the_data(text, words):
    assert tokenize_tweet(text) == words


def test_read_inputs_plain_pretokenized_and_conll():
    ids, words, gold = read_inputs(["a b,c", "", "x  y"], pretokenized=False)
    assert ids == ["line1", "line3"] and words == [["a", "b", ",", "c"], ["x", "y"]] and gold is None
    with pytest.raises(Exception, match="single spaces"):
        read_inputs(["x  y"], pretokenized=True)
    ids, words, gold = read_inputs(["IMGID:7", "Obama\tB-PER", "here\tO", ""], pretokenized=False)
    assert ids == ["7"] and words == [["Obama", "here"]] and gold == [["B-PER", "O"]]
    ids, words, gold = read_inputs(["IMGID:7", "Obama", "here"], pretokenized=False)
    assert words == [["Obama", "here"]] and gold is None


def test_entity_spans_use_exclusive_ends():
    spans = entity_spans(["New", "York", "rocks", "Obama"], ["B-LOC", "I-LOC", "O", "I-PER"])
    assert spans == [{"type": "LOC", "start": 0, "end": 2, "text": "New York"},
                     {"type": "PER", "start": 3, "end": 4, "text": "Obama"}]


@pytest.fixture
def trained_run(tmp_path, monkeypatch, fixture_registry, tiny_run_overrides):
    monkeypatch.setattr(registry_module, "_REGISTRY", fixture_registry)
    assert main(["run", "bertcrf", *tiny_run_overrides, "tracking.measure_speed=false"]) == 0
    folder = next((tmp_path / "runs").iterdir())
    return folder


def test_predict_on_the_test_file_equals_the_runs_predictions(tmp_path, trained_run, capsys):
    gold, pred = read_predictions(trained_run / "predictions.txt")
    test = (tmp_path / "data" / "fixture" / "test.txt").read_text()
    words = [[ln.split("\t")[0] for ln in block.splitlines()[1:]] for block in test.strip().split("\n\n")]
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(" ".join(ws) for ws in words) + "\n")
    capsys.readouterr()
    assert main(["predict", str(trained_run), "--input", str(plain), "--pretokenized", "--format", "conll"]) == 0
    out = capsys.readouterr().out
    tagged = [[ln.split("\t")[1] for ln in block.splitlines()[1:]] for block in out.strip().split("\n\n")]
    assert tagged == pred

    # the CoNLL test file itself, with gold tags, gives token, gold, predicted
    assert main(["predict", str(trained_run), "--input", str(tmp_path / "data" / "fixture" / "test.txt")]) == 0
    out = capsys.readouterr().out
    assert out.split("\n")[0].startswith("IMGID:") and out.split("\n")[1].count("\t") == 2

    assert main(["predict", str(trained_run), "--text", "Obama visits New York", "--format", "jsonl"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["tokens"] == ["Obama", "visits", "New", "York"] and isinstance(row["entities"], list)


def test_predict_errors_are_clear(tmp_path, trained_run, capsys):
    assert main(["predict", str(tmp_path / "nope"), "--text", "x"]) == 2
    assert "neither a run's output folder nor an MLflow run id" in capsys.readouterr().err
    assert main(["predict", str(trained_run), "--input", str(tmp_path / "missing.txt")]) == 2
    assert "file not found" in capsys.readouterr().err


def _mlflow_run_id(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fixture").experiment_id])
    return run.info.run_id


def test_logged_pyfunc_model_loads_and_agrees_with_predict(tmp_path, trained_run, capsys, monkeypatch):
    import mlflow
    import pandas as pd

    run_id = _mlflow_run_id(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    texts = ["RT @user : Obama visits New York", "Apple launches iPhone today"]
    got = model.predict(pd.DataFrame({"text": texts}))
    assert [g["tokens"] for g in got] == [tokenize_tweet(t) for t in texts]
    assert model.metadata.signature.inputs.input_names() == ["text"]
    capsys.readouterr()
    assert main(["predict", run_id, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--format", "jsonl",
                 "--input", str(_write(tmp_path / "t.txt", texts))]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [c["entities"] for c in cli] == [g["entities"] for g in got]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_entities(tmp_path, trained_run):
    import mlflow
    import pandas as pd

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _mlflow_run_id(tmp_path)
    port = _free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise AssertionError("server did not start") from None
                time.sleep(0.5)
        texts = ["RT @user : Obama visits New York", "Apple launches iPhone today"]
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
        mlflow.set_tracking_uri(uri)
        local = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(pd.DataFrame({"text": texts}))
        assert [a["entities"] for a in answer] == [loc["entities"] for loc in local]
        assert [a["tokens"] for a in answer] == [tokenize_tweet(t) for t in texts]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_evaluate_rescores_the_run_and_applies_overrides(trained_run, capsys):
    """``mner-bench evaluate RUN`` scores the test split with the best checkpoint exactly as the
    run's own final evaluation did; overrides are checked against the saved config."""
    import json

    metrics = json.loads((trained_run / "metrics.json").read_text())["test"]
    capsys.readouterr()
    assert main(["evaluate", str(trained_run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "test" and out["tweets"] > 0
    assert (out["f1"], out["precision"], out["recall"]) == (metrics["f1"], metrics["precision"], metrics["recall"])
    assert main(["evaluate", str(trained_run), "--split", "dev", "train.eval_batch_size=3"]) == 0
    assert "dev" in capsys.readouterr().out
    assert main(["evaluate", str(trained_run), "aligner.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["evaluate", str(trained_run), "--split", "nope"]) == 2
    assert "has no split 'nope'" in capsys.readouterr().err
