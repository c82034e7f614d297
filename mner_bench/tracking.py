"""MLflow tracking, as a plugin on the run lifecycle hooks.

Store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's own default, a local
SQLite store ``mlflow.db`` in the working folder (``mlflow ui`` started in the same folder
opens it). Experiment per data set (``tracking.experiment`` to override); run name
``method-dataset-shots-seed``; params = the flattened resolved config; per-epoch metrics;
final metrics; artifacts = config, predictions, metrics, shot ids.

The client API with explicit run ids is used (no global active run), so several runs in one
process or several processes on one store do not interfere.
"""

from __future__ import annotations

import logging
import os
import time

from .config import flatten
from .hookspecs import hookimpl

log = logging.getLogger(__name__)

KEY = "mlflow_run_id"


def tracking_uri(cfg) -> str:
    import mlflow

    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


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


@hookimpl
def mner_bench_run_start(run):
    if not run.cfg.tracking.enabled:
        return
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(run.cfg)
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, run.cfg.tracking.experiment or run.cfg.data.dataset)
    mrun = client.create_run(exp_id, run_name=run.run_name, tags={**run.tags, "output_dir": str(run.output_dir.resolve())})
    run.extras.update({"mlflow_client": client, KEY: mrun.info.run_id, "mlflow_uri": uri, "mlflow_experiment_id": exp_id})
    params = _params(run.cfg)
    for i in range(0, len(params), 100):
        client.log_batch(mrun.info.run_id, params=params[i : i + 100])
    client.log_batch(mrun.info.run_id, tags=[RunTag(k, str(v)) for k, v in run.tags.items()])


def _log(run, metrics: dict, step: int | None) -> None:
    client = _client(run)
    if client is None:
        return
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
    for i in range(0, len(ms), 500):
        client.log_batch(run.extras[KEY], metrics=ms[i : i + 500])


@hookimpl
def mner_bench_epoch_end(run, epoch, metrics):
    _log(run, metrics, epoch)


@hookimpl
def mner_bench_log_metrics(run, metrics, step):
    _log(run, metrics, step)


@hookimpl
def mner_bench_run_finish(run, result):
    client = _client(run)
    if client is None:
        return
    from mlflow.entities import RunTag

    # final metrics at the last epoch's step, later in time, so that MLflow shows them as latest
    _log(run, result.metrics, run.cfg.train.epochs)
    client.log_batch(run.extras[KEY], tags=[RunTag(k, str(v)) for k, v in run.tags.items()])
    for path in result.artifacts.values():
        client.log_artifact(run.extras[KEY], str(path))
    client.set_terminated(run.extras[KEY], "FINISHED")


@hookimpl
def mner_bench_run_failed(run, error):
    client = _client(run)
    if client is None:
        return
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    client.set_tag(run.extras[KEY], "error", f"{type(error).__name__}: {error}"[:5000])
    client.set_terminated(run.extras[KEY], status)
