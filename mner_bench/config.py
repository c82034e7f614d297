"""Run configuration: dataclass schemas merged in one fixed order, in struct mode.

Merge order (later wins): the schema's defaults (:class:`RunConfig` and each component's
``Config`` dataclass) -> the method's default YAML -> the data set's run defaults (generated
data sets set fewer epochs) -> ``--config FILE`` -> ``key=value`` overrides -> the CLI's own
options (``--dataset``, ``--shots``, ``--epochs``, ...).
An unknown key or a value of the wrong type fails with the key's full path and the layer
it came from. The resolved config saved with a run replays it (``mner-bench run --config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .registry import Registry
from .synth import SynthConfig

#: component slots of a run config and the registry kind that fills each
SLOTS = {"text_encoder": "text_encoder", "visual_encoder": "visual_encoder", "aligner": "aligner", "decoder": "decoder"}


@dataclass
class DataConfig:
    #: data set name (``t15``/``twitter2015``, ``t17``/``twitter2017``, ...)
    dataset: str = "t15"
    #: test on another data set (cross-domain); model selection stays on ``dataset``'s dev split
    eval_dataset: str | None = None
    #: folder holding ``twitter2015/`` and ``twitter2017/``; else $MNER_BENCH_DATA, else the user cache
    data_dir: str | None = None
    #: download a missing data file from its public source
    download: bool = True
    #: train on this many tweets drawn with ``seed`` (None: the whole training split)
    shots: int | None = None
    #: folder of ``<IMGID>.jpg`` images (multimodal methods); else the data set's own images
    #: (``synth-*``), else $MNER_BENCH_IMAGES; see mner_bench/images.py
    image_dir: str | None = None
    #: cache decoded, resized images on disk (uint8 ``.npy`` per image folder and image size)
    image_cache: bool = True
    #: folder of the image cache; else $MNER_BENCH_CACHE/images, else ~/.cache/mner-bench/images
    image_cache_dir: str | None = None
    #: images whose shorter side has fewer pixels are unusable (placeholders), counted corrupt
    image_min_side: int = 16
    #: splits whose images are withheld (counted ``images_withheld``), e.g. ``[test]`` to evaluate
    #: a model trained with images on text alone
    withhold_images: list[str] = field(default_factory=list)
    #: folder of object crops (HVPNeT/IFAformer style), up to ``max_crops`` per tweet as extra
    #: visual input; see mner_bench/images.py
    crop_dir: str | None = None
    #: JSON or torch-saved dict IMGID -> crop file names in ``crop_dir``; else ``<IMGID>_crop<k>.<ext>``
    crop_index: str | None = None
    max_crops: int = 3
    #: settings of the generated ``synth-ambiguous`` / ``synth-consistent`` data sets
    synth: SynthConfig = field(default_factory=SynthConfig)
    #: sub-tokens per tweet, special tokens included
    max_length: int = 128


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    eval_batch_size: int = 32
    #: learning rate of the pretrained encoders
    lr: float = 3e-5
    #: learning rate of everything else (aligner layers, tag projection, CRF). The paper gives
    #: only the encoder's; 1e-2 was chosen on t15 --shots 50 --epochs 10 seed 1 (dev/test F1
    #: 0.05/0.04 with 1e-3, 0.34/0.35 with 1e-2, 0.32/0.31 with 5e-2; MiniLM).
    head_lr: float = 1e-2
    weight_decay: float = 0.01
    warmup_ratio: float = 0.01
    grad_clip: float = 1.0
    #: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ...
    device: str = "auto"
    #: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``
    precision: str = "auto"
    #: keep checkpoints (best dev epoch, and the last epoch for --resume) in the output folder
    save_checkpoint: bool = True
    #: keep ``checkpoints/last.pt`` (the last epoch's weights and training state) when the run
    #: finishes, e.g. to analyse the final weights (``analyze-alignment --checkpoint``); by
    #: default a finished run keeps ``best.pt`` only
    keep_last: bool = False
    #: multimodal methods: also score the test set with uniform empty images and with no images
    eval_missing_images: bool = True


@dataclass
class TrackingConfig:
    #: log to MLflow
    enabled: bool = True
    #: MLflow tracking URI; else $MLFLOW_TRACKING_URI, else a local store ``./mlflow.db``
    uri: str | None = None
    #: experiment name; default: the data set's name
    experiment: str | None = None
    #: measure latency (batch 1) and throughput (batch 32) after training
    measure_speed: bool = True
    #: tweets used for the speed measurement
    speed_tweets: int = 64
    #: extra MLflow tags of the run (``tracking.tags.team=nlp``)
    tags: dict[str, str] = field(default_factory=dict)
    #: MLflow parent run (``mner-bench sweep`` sets it for its child runs)
    parent_run_id: str | None = None
    #: log the best checkpoint as an MLflow pyfunc model (``runs:/<id>/model``)
    log_model: bool = True


@dataclass
class RunConfig:
    method: str = MISSING
    seed: int = 1
    output_dir: str = "runs"
    #: default ``method-dataset-shots-seed``
    run_name: str | None = None
    #: show progress bars and the summary table
    quiet: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    text_encoder: Any = None
    visual_encoder: Any = None
    aligner: Any = None
    decoder: Any = None


def _layer(source: str, node: Any) -> tuple[str, DictConfig]:
    if node is None:
        return source, OmegaConf.create({})
    if isinstance(node, (str, Path)):
        path = Path(node)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = OmegaConf.load(path)
        except Exception as exc:
            raise ConfigError(f"{path}: not a valid YAML config: {exc}") from None
        if not isinstance(cfg, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        return str(path), cfg
    return source, OmegaConf.create(node)


def _dotlist(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot read overrides {overrides}: {exc}") from None


def resolve_config(
    registry: Registry,
    method: str,
    config_file: str | Path | None = None,
    overrides: list[str] = (),
    cli: dict[str, Any] | None = None,
) -> DictConfig:
    """Build the run config of ``method`` (see the module docstring for the order)."""
    spec = registry.spec("method", method)
    layers = [
        _layer(f"method '{spec.name}' defaults", spec.defaults),
        _layer("--config", config_file),
        ("command-line override", _dotlist(list(overrides))),
        ("command-line option", OmegaConf.from_dotlist([f"{k}={v}" for k, v in (cli or {}).items() if v is not None])),
    ]
    plain = OmegaConf.merge(*(node for _, node in layers))
    ds_spec = registry.spec("dataset", plain.get("data", {}).get("dataset", DataConfig.dataset))
    if ds_spec.run_defaults:
        layers.insert(1, (f"data set '{ds_spec.name}' defaults", OmegaConf.create(ds_spec.run_defaults)))
        plain = OmegaConf.merge(*(node for _, node in layers))
    picked = plain.get("method", spec.name)
    if picked != spec.name and registry.resolve_name("method", picked) != spec.name:
        raise ConfigError(f"the config is for method '{picked}' but the command runs '{spec.name}'")

    schema = OmegaConf.structured(RunConfig)
    for slot, kind in SLOTS.items():
        node = plain.get(slot)
        if node is None:
            continue
        ctype = node.get("type") if isinstance(node, DictConfig) else None
        if ctype is None:
            raise ConfigError(f"{slot}: needs a 'type' naming a registered {kind.replace('_', ' ')}")
        comp = registry.spec(kind, ctype)
        OmegaConf.set_struct(schema, False)
        schema[slot] = OmegaConf.structured(comp.config_class)
    OmegaConf.set_struct(schema, True)
    _open_free_dicts(schema)

    cfg = schema
    for source, node in layers:
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{source}: {_omega_message(exc)}") from None
    cfg.method = spec.name
    cfg.data.dataset = registry.resolve_name("dataset", cfg.data.dataset)
    registry.spec("dataset", cfg.data.dataset)  # unknown data set: fail now, with the list
    if cfg.data.eval_dataset:
        cfg.data.eval_dataset = registry.resolve_name("dataset", cfg.data.eval_dataset)
        registry.spec("dataset", cfg.data.eval_dataset)
    validate(cfg)
    return cfg


def _open_free_dicts(node: DictConfig) -> None:
    """Fields typed as plain dicts (``dict[str, Any]``) take any key, even in struct mode."""
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if child._metadata.object_type in (None, dict):
                OmegaConf.set_struct(child, False)
            else:
                _open_free_dicts(child)


def validate(cfg: DictConfig) -> None:
    """Checks of values that types alone do not catch."""
    if cfg.data.shots is not None and cfg.data.shots <= 0:
        raise ConfigError(f"data.shots (--shots) must be a positive number of tweets, got {cfg.data.shots}")
    if cfg.train.epochs <= 0:
        raise ConfigError(f"train.epochs must be positive, got {cfg.train.epochs}")
    for key in ("batch_size", "eval_batch_size"):
        if cfg.train[key] <= 0:
            raise ConfigError(f"train.{key} must be positive, got {cfg.train[key]}")
    if cfg.train.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision must be auto, fp32 or bf16, got '{cfg.train.precision}'")
    if cfg.data.max_length < 8:
        raise ConfigError(f"data.max_length must be at least 8, got {cfg.data.max_length}")


def _omega_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if "not in" in msg and key:
        return f"unknown key '{key}' ({msg})"
    if key:
        return f"key '{key}': {msg}"
    return msg


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 3e-5, ...}`` for MLflow params."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, Any] = {}
    for k, v in container.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
