"""The plugin contract of mner-bench: every hook a plugin may implement.

A plugin is a module (or object) with functions marked ``@hookimpl`` and named after
the specs below; it is found through the packaging entry-point group ``mner_bench``.
The built-in components (``mner_bench.builtin``) and the baselines register exactly the
same way a third-party plugin does. Implementations may accept any subset of a spec's
arguments; specs grow by adding arguments, never by renaming them.

Sections: registration (components, data sets, methods), then the run lifecycle
(on which MLflow tracking and progress reporting are built as plugins themselves).
"""

from __future__ import annotations

import pluggy

PROJECT = "mner_bench"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- registration
# Each returns a list of ``mner_bench.registry.ComponentSpec`` (or ``MethodSpec`` /
# ``DatasetSpec``). Called once per plugin at start-up; names must be unique across
# plugins (a duplicate is an error that names both plugins).


@hookspec
def mner_bench_text_encoders():
    """Contribute text encoders.

    :return: list of :class:`~mner_bench.registry.ComponentSpec` whose factory is called as
        ``factory(cfg)`` and returns a :class:`~mner_bench.model.TextEncoder`.
    """


@hookspec
def mner_bench_visual_encoders():
    """Contribute visual (image) encoders.

    :return: list of :class:`~mner_bench.registry.ComponentSpec` whose factory is called as
        ``factory(cfg)`` and returns a :class:`~mner_bench.model.VisualEncoder`.
    """


@hookspec
def mner_bench_aligners():
    """Contribute aligners: how text and image states interact.

    :return: list of :class:`~mner_bench.registry.ComponentSpec` whose factory is called as
        ``factory(cfg, text_encoder=..., visual_encoder=...)`` (``visual_encoder`` may be
        None) and returns a :class:`~mner_bench.model.Aligner`.
    """


@hookspec
def mner_bench_decoders():
    """Contribute tag decoders (CRF, softmax, ...).

    :return: list of :class:`~mner_bench.registry.ComponentSpec` whose factory is called as
        ``factory(cfg, input_size=..., num_tags=..., labels=...)`` and returns a
        :class:`~mner_bench.model.Decoder`.
    """


@hookspec
def mner_bench_datasets():
    """Contribute data sets.

    :return: list of :class:`~mner_bench.registry.DatasetSpec`. Aliases (``t15`` for
        ``twitter2015``) are separate entries with the same loader.
    """


@hookspec
def mner_bench_methods():
    """Contribute named methods: recipes that combine components.

    :return: list of :class:`~mner_bench.registry.MethodSpec`; each carries a default YAML
        (or dict) naming its text encoder, visual encoder, aligner, decoder and settings.
    """


# --------------------------------------------------------------------------- run lifecycle
# ``run`` is a :class:`~mner_bench.training.RunContext`: the resolved config, the output
# folder, the run name, tags and a ``extras`` dict in which plugins may keep state (the
# MLflow plugin keeps its run id there). Hooks are called in registration order; an
# exception raised by one propagates (a lifecycle plugin must not hide errors).


@hookspec
def mner_bench_run_start(run):
    """A run begins: the config is resolved, the output folder exists, the model is built.

    :param run: the run context; ``run.params`` holds parameter counts.
    """


@hookspec
def mner_bench_epoch_start(run, epoch, num_steps):
    """A training epoch begins.

    :param epoch: 1-based epoch number.
    :param num_steps: optimizer steps in this epoch.
    """


@hookspec
def mner_bench_step_end(run, epoch, step, loss):
    """One optimizer step ended.

    :param step: 1-based step within the epoch.
    :param loss: the step's training loss (a float).
    """


@hookspec
def mner_bench_evaluate_start(run, split, num_batches):
    """Evaluation of a split begins (``split`` is ``"dev"`` or ``"test"``)."""


@hookspec
def mner_bench_evaluate_step(run, split):
    """One evaluation batch ended."""


@hookspec
def mner_bench_epoch_end(run, epoch, metrics):
    """A training epoch ended and the dev set was scored.

    :param metrics: dict of float metrics for this epoch (``train_loss``, ``dev_f1``, and any
        ``loss_*`` parts an aligner reported).
    """


@hookspec
def mner_bench_log_metrics(run, metrics, step):
    """Extra metrics to record (for example image counts, latency). ``step`` may be None."""


@hookspec
def mner_bench_run_finish(run, result):
    """A run finished successfully.

    :param result: :class:`~mner_bench.training.RunResult` with final metrics and the paths of
        the artifacts written in the output folder.
    """


@hookspec
def mner_bench_run_failed(run, error):
    """A run stopped with an error (including KeyboardInterrupt); the error still propagates."""
