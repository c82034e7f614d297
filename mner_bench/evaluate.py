"""Score a finished run's selected model again, on any split, with changed settings.

``mner-bench evaluate RUN [key=value ...]`` loads a run's ``config.yaml`` and
``checkpoints/best.pt``, applies the overrides to the saved config (struct mode: an unknown key
fails, naming it) and scores the chosen split as the run's own final evaluation does. Typical
uses: a run's model with real instead of generated visual features
(``aligner.inference_visual=real``, the BGA paper's Table 4), with an image folder it did not
have (``--image-dir``), or with every image replaced (``data.withhold_images=[test]``).
Settings that change the model's shape cannot be overridden: the weights would not load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, MnerBenchError
from .metrics import Scores


@dataclass
class EvalResult:
    scores: Scores
    split: str
    dataset: str
    tweets: int
    run_dir: Path
    #: image counts of the evaluation (``images_found``, ...) for methods that read images
    image_metrics: dict[str, float]


def run_config(folder: Path, registry, overrides: list[str] = (), cli: dict | None = None):
    """A finished run's saved config, resolved again with ``overrides`` and command-line ``cli``
    options (struct mode: an unknown key fails, naming it)."""
    from omegaconf import OmegaConf

    from .config import resolve_config

    saved = folder / "config.yaml"
    method = OmegaConf.load(saved).get("method")
    if not method:
        raise ConfigError(f"{saved}: no 'method' key; is it the config of a 'mner-bench run'?")
    return resolve_config(registry, method, saved, list(overrides), cli)


def read_checkpoint(folder: Path, checkpoint: Path | None = None) -> tuple[Path, dict]:
    """``(path, contents)`` of the run's ``checkpoints/best.pt``, or of ``checkpoint``: another
    file with the same ``model`` entry, such as a copy of ``last.pt`` (which also holds RNG
    states, so it is read with ``weights_only=False``: pass only files you trust)."""
    path = Path(checkpoint) if checkpoint is not None else folder / "checkpoints" / "best.pt"
    if not path.is_file():
        raise MnerBenchError(f"{path}: no such checkpoint file")
    contents = torch.load(path, map_location="cpu", weights_only=checkpoint is None)
    if not isinstance(contents, dict) or "model" not in contents:
        raise MnerBenchError(f"{path}: not a mner-bench checkpoint (no 'model' entry)")
    return path, contents


def model_from_checkpoint(cfg, registry, path: Path, contents: dict):
    """The model of ``cfg`` with the weights of a checkpoint read by :func:`read_checkpoint`,
    in eval mode, on the CPU."""
    from .training import build_model

    model = build_model(cfg, registry)
    try:
        model.load_state_dict(contents["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise MnerBenchError(f"{path} does not fit the model of its config "
                             f"(did an override change the model's shape?): {first}") from None
    return model.eval()


def load_best_model(folder: Path, cfg, registry):
    """The model of ``cfg`` with the run's ``checkpoints/best.pt`` weights, in eval mode, on the CPU."""
    return model_from_checkpoint(cfg, registry, *read_checkpoint(folder))


def split_tweets(cfg, registry, split: str):
    """``(data set name, tweets)`` of a run's ``split``: the test split of a cross-domain run
    comes from its ``data.eval_dataset``."""
    name = cfg.data.eval_dataset if split == "test" and cfg.data.eval_dataset else cfg.data.dataset
    spec = registry.spec("dataset", name)
    if split not in spec.splits:
        raise ConfigError(f"--split: data set '{name}' has no split '{split}'; splits: {', '.join(spec.splits)}")
    return name, spec.loader(split, cfg.data)


def evaluate_run(target: str | Path, overrides: list[str] = (), split: str = "test", registry=None,
                 tracking_uri: str | None = None, device: str = "auto", image_dir: str | None = None) -> EvalResult:
    """Score ``split`` with the run's best checkpoint under the saved config plus ``overrides``."""
    from .predict import run_folder
    from .registry import get_registry
    from .training import Batcher, RunContext, autocast_dtype, encode_split, evaluate, pick_device

    registry = registry or get_registry()
    folder = run_folder(target, tracking_uri)
    cfg = run_config(folder, registry, overrides, {"data.image_dir": image_dir} if image_dir else None)
    model = load_best_model(folder, cfg, registry)
    dev = pick_device(device)
    model.to(dev)
    name, tweets = split_tweets(cfg, registry, split)
    ctx = RunContext(cfg, folder, folder.name, registry)
    provider = None
    if getattr(model.aligner, "uses_images", False):
        from .images import make_image_provider

        provider = make_image_provider(cfg, model, ctx)
    batcher = Batcher(model.text_encoder.tokenizer.pad_token_id, provider)
    enc = encode_split(tweets, model, cfg.data.max_length)
    scores, _ = evaluate(model, batcher, enc, cfg, dev, autocast_dtype(cfg.train.precision, dev), name=split)
    image_metrics = dict(ctx.extras.get("final_metrics", {}))
    return EvalResult(scores, split, name, len(tweets), folder, image_metrics)


def format_result(res: EvalResult, overrides: list[str] = ()) -> str:
    s = res.scores
    lines = [f"{res.run_dir.name}: {res.dataset} {res.split} ({res.tweets} tweets)"
             + (f" with {' '.join(overrides)}" if overrides else ""),
             f"  F1 {s.f1:.4f} (P {s.precision:.4f}, R {s.recall:.4f})",
             "  " + ", ".join(f"{t} {v['f1']:.4f}" for t, v in s.per_type.items())]
    if res.image_metrics:
        lines.append("  images: " + ", ".join(f"{k.removeprefix('images_')} {int(v)}" for k, v in sorted(res.image_metrics.items())
                                             if k.startswith("images_")))
    return "\n".join(lines)
