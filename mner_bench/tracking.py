"""MLflow tracking, as a plugin on the run lifecycle hooks.

Store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's own default, a local
SQLite store ``mlflow.db`` in the working folder (``mlflow ui`` started in the same folder
opens it). Experiment per data set (``tracking.experiment`` to override); run name
``method-dataset-shots-seed``; params = the flattened resolved config; per-epoch metrics;
final metrics; artifacts = config, predictions, metrics, shot ids, epoch history.

The client API with explicit run ids is used (no global active run), so several runs in one
process or several processes on one store do not interfere. If the store cannot be reached
when a run starts, the run still trains and writes its outputs, warns, and can be logged later
with ``mner-bench log-run FOLDER``. A resumed run (``--resume``) continues its MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .config import flatten
from .hookspecs import hookimpl

log = logging.getLogger(__name__)

KEY = "mlflow_run_id"
PENDING = "tracking_pending.txt"


def resolve_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's default (``sqlite:///mlflow.db``)."""
    import mlflow

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def tracking_uri(cfg) -> str:
    return resolve_uri(cfg.tracking.uri)


def _client(run):
    return run.extras.get("mlflow_client")


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    for _ in range(5):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException:  # created meanwhile by another process: read it again
            time.sleep(0.2)
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id


def _params(cfg) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in sorted(flatten(cfg).items())]


def connect(uri: str):
    """A client for ``uri`` that has answered once; raises quickly if a server does not answer.

    A new local SQLite store is created under a file lock, so that several processes starting
    at once on a fresh store do not race through MLflow's table creation.
    """
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        with FileLock(str(db) + ".lock", timeout=120):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        return client
    client = MlflowClient(tracking_uri=uri)
    client.search_experiments(max_results=1)
    return client


def start_tracking(cfg, run_name: str, tags: dict, output_dir: Path, resume_id: str | None = None):
    """Create (or, with ``resume_id``, reopen) the MLflow run; returns (client, run id, uri)."""
    from mlflow.entities import RunTag

    uri = tracking_uri(cfg)
    client = connect(uri)
    if resume_id:
        client.update_run(resume_id, status="RUNNING")
        client.log_batch(resume_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        _relog_history(client, resume_id, Path(output_dir))
        return client, resume_id, uri
    exp_id = _experiment_id(client, cfg.tracking.experiment or cfg.data.dataset)
    all_tags = {**tags, **dict(cfg.tracking.tags), "output_dir": str(Path(output_dir).resolve())}
    if cfg.tracking.parent_run_id:
        all_tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    mrun = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    params = _params(cfg)
    for i in range(0, len(params), 100):
        client.log_batch(mrun.info.run_id, params=params[i : i + 100])
    return client, mrun.info.run_id, uri


def _relog_history(client, run_id: str, folder: Path) -> None:
    """Log the epochs of ``history.jsonl`` that the MLflow run lacks (a kill can fall between
    the checkpoint of an epoch and the logging of its metrics)."""
    path = folder / "history.jsonl"
    if not path.exists():
        return
    logged = {m.step for m in client.get_metric_history(run_id, "train_loss")}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        epoch = row.pop("epoch")
        if epoch not in logged:
            log_metrics(client, run_id, row, epoch)


@hookimpl
def mner_bench_run_start(run):
    if not run.cfg.tracking.enabled:
        return
    try:
        client, run_id, uri = start_tracking(run.cfg, run.run_name, run.tags, run.output_dir,
                                             run.extras.get("resume_run_id"))
    except Exception as exc:  # the store is unreachable: train anyway, log later
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning("MLflow store %s cannot be reached (%s). The run goes on and writes its outputs to %s; "
                    "log it later with: mner-bench log-run %s", tracking_uri(run.cfg), reason, run.output_dir,
                    run.output_dir)
        (run.output_dir / PENDING).write_text(f"{tracking_uri(run.cfg)}\n{reason}\n")
        return
    run.extras.update({"mlflow_client": client, KEY: run_id, "mlflow_uri": uri})


def _log(run, metrics: dict, step: int | None) -> None:
    client = _client(run)
    if client is None:
        return
    log_metrics(client, run.extras[KEY], metrics, step)


def log_metrics(client, run_id: str, metrics: dict, step: int | None) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
    for i in range(0, len(ms), 500):
        client.log_batch(run_id, metrics=ms[i : i + 500])


@hookimpl
def mner_bench_epoch_end(run, epoch, metrics):
    _log(run, metrics, epoch)


@hookimpl
def mner_bench_log_metrics(run, metrics, step):
    _log(run, metrics, step)


def finish_tracking(client, run_id: str, cfg, tags: dict, metrics: dict, artifacts) -> None:
    from mlflow.entities import RunTag

    # final metrics at the last epoch's step, later in time, so that MLflow shows them as latest
    log_metrics(client, run_id, metrics, cfg.train.epochs)
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    for path in artifacts:
        if Path(path).exists():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")


@hookimpl
def mner_bench_run_finish(run, result):
    client = _client(run)
    if client is None:
        return
    if run.cfg.tracking.log_model:
        weights = run.output_dir / "checkpoints" / "best.pt"
        if weights.exists():
            from .serving import log_pyfunc_model

            result.artifacts["model_uri"] = log_pyfunc_model(run.extras[KEY], run.extras["mlflow_uri"],
                                                             run.output_dir / "config.yaml", weights)
        else:
            log.warning("no checkpoint to log as an MLflow model (train.save_checkpoint=false)")
    finish_tracking(client, run.extras[KEY], run.cfg, run.tags, result.metrics,
                    [p for k, p in result.artifacts.items() if k != "model_uri"])


@hookimpl
def mner_bench_run_failed(run, error):
    client = _client(run)
    if client is None:
        return
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    client.set_tag(run.extras[KEY], "error", f"{type(error).__name__}: {error}"[:5000])
    client.set_terminated(run.extras[KEY], status)


def log_run_folder(folder: Path, uri: str | None = None) -> str:
    """Log a finished run's output folder to MLflow (``mner-bench log-run``); returns the run id."""
    from omegaconf import OmegaConf

    from .errors import MnerBenchError

    folder = Path(folder)
    for name in ("config.yaml", "metrics.json", "history.jsonl"):
        if not (folder / name).exists():
            raise MnerBenchError(f"{folder}: no {name}; log-run needs the folder of a finished run")
    cfg = OmegaConf.load(folder / "config.yaml")
    if uri:
        cfg.tracking.uri = uri
    metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
    history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines() if line]
    tags = {"method": cfg.method, "dataset": cfg.data.dataset, "logged_later": "true"}
    if cfg.data.eval_dataset:
        tags.update({"cross_domain": "true", "eval_dataset": cfg.data.eval_dataset})
    client, run_id, _ = start_tracking(cfg, folder.name, tags, folder)
    for row in history:
        epoch = row.pop("epoch")
        log_metrics(client, run_id, row, epoch)
    artifacts = [folder / n for n in ("config.yaml", "predictions.txt", "metrics.json", "shots.txt", "history.jsonl")]
    finish_tracking(client, run_id, cfg, tags, metrics, artifacts)
    (folder / PENDING).unlink(missing_ok=True)
    return run_id
