"""Benchmark set-up: offline, real Twitter data, generated tweet images, devices, and the
targets of issue 6 computed from this run's own statistics (see BENCHMARKS.md).

Run with ``pytest benchmarks/ --benchmark-only`` (``tox -e benchmarks``). Environment:

* ``MNER_BENCH_DATA``: the folder holding ``twitter2015/`` (default ``../shared/data`` next
  to the repository when it exists); without it the data benchmarks skip.
* ``MNER_BENCH_NUM_THREADS``: torch CPU threads (default 1: timings on a machine shared with
  other jobs are far steadier on one thread than on threads that wait for each other; 0
  leaves torch's default).
* ``MNER_BENCH_ROUNDS``: timed rounds of the heavy (model) benchmarks (default 3, after one
  warm-up round); the light ones follow ``--benchmark-min-rounds`` / ``--benchmark-max-time``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .common import ROUNDS
from .targets import evaluate_all, format_table

THREADS = int(os.environ.get("MNER_BENCH_NUM_THREADS", "1"))
if THREADS > 0:
    torch.set_num_threads(THREADS)

#: side of the generated tweet images written to disk (JPEG); decoded and resized to 224
IMAGE_SIDE = 512
#: t15 tweets that get an image: the first 32 test tweets (inference) and 16 training tweets
IMAGES_TEST, IMAGES_TRAIN = 32, 16

NO_CUDA = ("no CUDA device here (torch.cuda.is_available() is False): the GPU cases (bf16 autocast) "
           "run only on a machine with a GPU")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """The device of a benchmark that runs on both; CUDA cases skip without a GPU."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    return torch.device(request.param)


@pytest.fixture(scope="session")
def registry():
    from mner_bench.registry import get_registry

    return get_registry()


@pytest.fixture(scope="session")
def t15(registry) -> dict:
    """Twitter2015's splits (``train``, ``dev``, ``test``)."""
    from mner_bench.config import DataConfig
    from mner_bench.data import data_dir

    if not (data_dir() / "twitter2015" / "test.txt").exists():
        pytest.skip("Twitter2015 not found: set MNER_BENCH_DATA to the folder holding twitter2015/")
    cfg = DataConfig(dataset="t15", download=False)
    spec = registry.spec("dataset", "t15")
    return {split: spec.loader(split, cfg) for split in ("train", "dev", "test")}


def _image_tweets(t15: dict) -> list:
    """The t15 tweets that get an image (``IMAGES_TEST`` test and ``IMAGES_TRAIN`` training ones)."""
    return [*t15["test"][:IMAGES_TEST], *t15["train"][:IMAGES_TRAIN]]


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory, t15) -> Path:
    """Generated JPEGs (``IMAGE_SIDE`` pixels square) for the tweets the benchmarks use (the real
    tweet images are not available offline)."""
    from mner_bench.synth import write_images

    out = tmp_path_factory.mktemp("images")
    write_images(_image_tweets(t15), out, size=IMAGE_SIDE)
    return out


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory, image_dir, t15):
    """The suite's disk cache of those images at 224 pixels (CLIP ViT-B/32's size)."""
    from mner_bench.images import ImageCache, ImageDirectory

    ids = [t.imgid for t in _image_tweets(t15)]
    return ImageCache.open_or_build(tmp_path_factory.mktemp("image-cache"), ImageDirectory(image_dir), ids, 224, 16)


# --------------------------------------------------------------------------- targets

_MEASURED: dict[str, object] = {}  # benchmark key -> pytest-benchmark fixture with stats
_LOAD: dict[str, tuple[float, float, float]] = {}


def _stats() -> dict[str, dict[str, float]]:
    return {key: {"min": fx.stats.stats.min, "median": fx.stats.stats.median, "mean": fx.stats.stats.mean}
            for key, fx in _MEASURED.items()}


def _results():
    return evaluate_all(_stats())


def pytest_sessionstart(session):
    _LOAD["start"] = os.getloadavg()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """After each benchmark: remember its statistics under its key, and write every ratio whose
    two sides are now measured into the numerator's ``extra_info`` (so into the JSON)."""
    yield
    fx = getattr(item, "funcargs", {}).get("benchmark")
    if fx is None or fx.stats is None or not fx.extra_info.get("key"):
        return
    _MEASURED[fx.extra_info["key"]] = fx
    for r in _results():
        if r.ratio_min is not None and r.numerator in _MEASURED:
            _MEASURED[r.numerator].extra_info[f"ratio: {r.name}"] = {
                "ratio_min": r.ratio_min, "ratio_median": r.ratio_median, "target": r.target, "verdict": r.verdict}


def _environment() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "heavy_rounds": ROUNDS, "load_average_start": _LOAD.get("start"), "load_average_end": os.getloadavg(),
    }


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["mner_bench"] = _environment()


#: per-round times are kept in the JSON for benchmarks of at most this many rounds (the model
#: benchmarks); the light ones (hundreds of rounds) keep their summary statistics only
KEEP_ROUND_TIMES = 25


def trim_round_times(output_json: dict) -> dict:
    """Drop the per-round times of benchmarks with more than ``KEEP_ROUND_TIMES`` rounds."""
    for bench in output_json.get("benchmarks", []):
        stats = bench.get("stats", {})
        if stats.get("rounds", 0) > KEEP_ROUND_TIMES:
            stats.pop("data", None)
    return output_json


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["mner_bench_targets"] = [r.as_dict() for r in _results()]
    trim_round_times(output_json)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _MEASURED:
        return
    env = _environment()
    terminalreporter.section("mner-bench targets (ratios of this run's benchmarks)")
    terminalreporter.write_line(format_table(_results()))
    terminalreporter.write_line(
        f"\n{env['cpu_model']} ({env['cpu_count']} CPUs), torch {env['torch']} on {env['torch_threads']} thread(s), "
        f"GPU: {env['gpu'] or 'none'}; load average (1/5/15 min) at start {_fmt_load(env['load_average_start'])}, "
        f"at end {_fmt_load(env['load_average_end'])}")


def _fmt_load(load) -> str:
    return "?" if not load else "/".join(f"{x:.1f}" for x in load)
