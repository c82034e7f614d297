"""Progress bars (epochs, steps, evaluation; with ETA) and the end-of-run summary table, as a
plugin on the run lifecycle hooks. Silent with ``--quiet``."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .hookspecs import hookimpl

console = Console(stderr=True)


def _bars(run) -> Progress | None:
    return run.extras.get("progress")


@hookimpl
def mner_bench_run_start(run):
    if run.quiet:
        return
    p = run.params
    console.print(
        f"[bold]{run.run_name}[/]  params: total {p['params_total']:,}, trainable {p['params_trainable']:,}, "
        f"inference {p['params_inference']:,}  ->  {run.output_dir}"
    )
    bars = Progress(
        TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=False,
    )
    bars.start()
    run.extras["progress"] = bars
    run.extras["progress_epochs"] = bars.add_task("epochs", total=run.cfg.train.epochs, info="")


@hookimpl
def mner_bench_epoch_start(run, epoch, num_steps):
    bars = _bars(run)
    if bars is None:
        return
    old = run.extras.pop("progress_steps", None)
    if old is not None:
        bars.remove_task(old)
    run.extras["progress_steps"] = bars.add_task(f"epoch {epoch}", total=num_steps, info="")


@hookimpl
def mner_bench_step_end(run, epoch, step, loss):
    bars = _bars(run)
    if bars is not None:
        bars.update(run.extras["progress_steps"], advance=1, info=f"loss {loss:.3f}")


@hookimpl
def mner_bench_evaluate_start(run, split, num_batches):
    bars = _bars(run)
    if bars is None:
        return
    old = run.extras.pop("progress_eval", None)
    if old is not None:
        bars.remove_task(old)
    run.extras["progress_eval"] = bars.add_task(split, total=num_batches, info="")


@hookimpl
def mner_bench_evaluate_step(run, split):
    bars = _bars(run)
    if bars is not None:
        bars.update(run.extras["progress_eval"], advance=1)


@hookimpl
def mner_bench_epoch_end(run, epoch, metrics):
    bars = _bars(run)
    if bars is None:
        return
    info = f"dev F1 {metrics['dev_f1']:.4f} (best {metrics['best_dev_f1']:.4f})"
    bars.update(run.extras["progress_epochs"], advance=1, info=info)


def _stop(run):
    bars = run.extras.pop("progress", None)
    if bars is not None:
        bars.stop()


def summary_table(result, title: str) -> Table:
    table = Table(title=title)
    table.add_column("split")
    for col in ("P", "R", "F1", "PER", "LOC", "ORG", "MISC"):
        table.add_column(col, justify="right")
    for name, s in (("dev", result.dev_scores), ("test", result.test_scores)):
        table.add_row(name, *(f"{100 * v:.2f}" for v in (s.precision, s.recall, s.f1)),
                      *(f"{100 * s.per_type.get(t, {}).get('f1', 0.0):.2f}" for t in ("PER", "LOC", "ORG", "MISC")))
    return table


@hookimpl
def mner_bench_run_finish(run, result):
    _stop(run)
    if run.quiet:
        return
    console.print(summary_table(result, f"{run.run_name} (best dev epoch {result.best_epoch})"))


@hookimpl
def mner_bench_run_failed(run, error):
    _stop(run)
