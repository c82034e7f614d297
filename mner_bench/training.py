"""Runs: build a method's model, train it, select on dev F1, test, write and report outputs.

One code path for every device: the device is picked from ``train.device`` (CUDA when
available), and ``train.precision`` turns on bf16 autocast (default on CUDA). Reporting
(MLflow, progress bars) happens in plugins on the lifecycle hooks; nothing here imports
mlflow.

Outputs of a run, in ``<output_dir>/<run_name>/``: ``config.yaml`` (resolved, replayable),
``predictions.txt`` (CoNLL: ``token<TAB>gold<TAB>predicted``, every test word),
``metrics.json``, ``shots.txt`` (training IMGIDs when ``--shots`` is used) and
``checkpoints/best.pt``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .data import Tweet, sample_shots, write_conll
from .errors import ConfigError, MnerBenchError, TrainingError
from .labels import TAGS, decode_tags, encode_tags
from .metrics import Scores, score
from .model import Batch, EncodedText, MnerModel, collate_text
from .registry import Registry

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- run state


@dataclass
class RunContext:
    """What lifecycle plugins see of a run."""

    cfg: DictConfig
    output_dir: Path
    run_name: str
    registry: Registry
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def hook(self):
        return self.registry.hook

    @property
    def quiet(self) -> bool:
        return bool(self.cfg.quiet)


@dataclass
class RunResult:
    metrics: dict[str, float]
    artifacts: dict[str, Path]
    dev_scores: Scores
    test_scores: Scores
    best_epoch: int
    output_dir: Path
    tracking_id: str | None = None
    tracking_uri: str | None = None


# --------------------------------------------------------------------------- data


@dataclass
class EncodedSplit:
    """A split's tweets with each tweet's sub-tokens cached (tokenised once)."""

    tweets: list[Tweet]
    encoded: list[EncodedText]

    def __len__(self) -> int:
        return len(self.tweets)

    @property
    def words_unseen(self) -> int:
        """Words past the length limit (scored as predicted ``O``)."""
        return sum(e.num_words - len(e.word_starts) for e in self.encoded)


def encode_split(tweets: Sequence[Tweet], model: MnerModel, max_length: int) -> EncodedSplit:
    enc = [model.text_encoder.encode_words(t.tokens, max_length) for t in tweets]
    return EncodedSplit(list(tweets), enc)


class Batcher:
    """Turns a split into :class:`Batch` es; loads images when the aligner uses them."""

    def __init__(self, pad_id: int, image_provider: Any | None = None):
        self.pad_id = pad_id
        self.image_provider = image_provider

    def __call__(self, split: EncodedSplit, indices: Sequence[int], labelled: bool = True) -> Batch:
        tweets = [split.tweets[i] for i in indices]
        text = collate_text([split.encoded[i] for i in indices], self.pad_id)
        tags = None
        if labelled:
            tags = torch.zeros(text.word_starts.shape, dtype=torch.long)
            for b, tw in enumerate(tweets):
                tags[b, : len(tw.tags)] = torch.tensor(encode_tags(tw.tags))
        images = image_mask = None
        if self.image_provider is not None:
            images, image_mask = self.image_provider(tweets)
        return Batch([t.imgid for t in tweets], text, tags, images, image_mask)

    def iterate(self, split: EncodedSplit, batch_size: int, shuffle_rng: random.Random | None = None) -> Iterator[Batch]:
        order = list(range(len(split)))
        if shuffle_rng is not None:
            shuffle_rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield self(split, order[i : i + batch_size])


# --------------------------------------------------------------------------- helpers


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision == "bf16" else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_model(cfg: DictConfig, registry: Registry) -> MnerModel:
    """Build a method's model from its resolved config."""
    text = registry.create_component("text_encoder", cfg.text_encoder.type, cfg.text_encoder)
    visual = None
    if cfg.visual_encoder is not None:
        visual = registry.create_component("visual_encoder", cfg.visual_encoder.type, cfg.visual_encoder)
    aligner = registry.create_component("aligner", cfg.aligner.type, cfg.aligner, text_encoder=text, visual_encoder=visual)
    decoder = registry.create_component(
        "decoder", cfg.decoder.type, cfg.decoder, input_size=aligner.output_size, num_tags=len(TAGS), labels=TAGS
    )
    return MnerModel(text, aligner, decoder, visual)


def make_optimizer(model: MnerModel, cfg: DictConfig, total_steps: int):
    """AdamW with the encoders at ``train.lr`` and everything else at ``train.head_lr``;
    no weight decay on biases and LayerNorm weights; linear warm-up then linear decay."""
    from transformers import get_linear_schedule_with_warmup

    encoder_ids = {id(p) for m in (model.text_encoder, model.visual_encoder) if m is not None for p in m.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2  # biases and norm weights
        groups.setdefault((id(p) in encoder_ids, no_decay), []).append(p)
    param_groups = [
        {
            "params": ps,
            "lr": cfg.train.lr if is_enc else cfg.train.head_lr,
            "weight_decay": 0.0 if no_decay else cfg.train.weight_decay,
        }
        for (is_enc, no_decay), ps in sorted(groups.items())
    ]
    opt = torch.optim.AdamW(param_groups)
    warmup = int(math.ceil(cfg.train.warmup_ratio * total_steps))
    sched = get_linear_schedule_with_warmup(opt, warmup, total_steps)
    return opt, sched


@torch.no_grad()
def predict_split(model: MnerModel, batcher: Batcher, split: EncodedSplit, batch_size: int, device: torch.device,
                  amp: torch.dtype | None, run: RunContext | None = None, name: str = "test") -> list[list[str]]:
    """Predicted tags for every word of every tweet of ``split``."""
    model.eval()
    out: list[list[str]] = []
    n_batches = math.ceil(len(split) / batch_size)
    if run is not None:
        run.hook.mner_bench_evaluate_start(run=run, split=name, num_batches=n_batches)
    for batch in batcher.iterate(split, batch_size):
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            ids = model.predict(batch)
        out.extend(decode_tags(seq) for seq in ids)
        if run is not None:
            run.hook.mner_bench_evaluate_step(run=run, split=name)
    return out


def evaluate(model, batcher, split, cfg, device, amp, run=None, name="dev") -> tuple[Scores, list[list[str]]]:
    pred = predict_split(model, batcher, split, cfg.train.eval_batch_size, device, amp, run, name)
    return score([t.tags for t in split.tweets], pred), pred


@torch.no_grad()
def measure_speed(model: MnerModel, batcher: Batcher, split: EncodedSplit, device: torch.device,
                  amp: torch.dtype | None, n: int = 64) -> dict[str, float]:
    """``latency_ms_b1``: median ms per tweet at batch 1; ``throughput_b32``: tweets/s at batch 32.

    Both after a warm-up, on the run's device, including collation (what a user waits for).
    """
    model.eval()
    n = min(n, len(split))
    idx = list(range(n))

    def run_batch(ix):
        batch = batcher(split, ix, labelled=False).to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            model.predict(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in idx[: min(5, n)]:
        run_batch([i])
    times = []
    for i in idx:
        t0 = time.perf_counter()
        run_batch([i])
        times.append((time.perf_counter() - t0) * 1000)
    b32 = [idx[i : i + 32] for i in range(0, n, 32)]
    run_batch(b32[0])
    t0 = time.perf_counter()
    for ix in b32:
        run_batch(ix)
    dt = time.perf_counter() - t0
    return {"latency_ms_b1": statistics.median(times), "throughput_b32": n / dt}


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def default_run_name(cfg: DictConfig) -> str:
    shots = cfg.data.shots if cfg.data.shots is not None else "full"
    name = f"{cfg.method}-{cfg.data.dataset}-{shots}-{cfg.seed}"
    if cfg.data.eval_dataset:
        name += f"-to-{cfg.data.eval_dataset}"
    return name


def unique_dir(parent: Path, name: str) -> Path:
    """``parent/name``, or ``parent/name-2``, ... when taken (runs never overwrite each other)."""
    path = parent / name
    k = 2
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            path = parent / f"{name}-{k}"
            k += 1
        except OSError as exc:
            raise ConfigError(f"output folder {path} cannot be created: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- the run


def run(cfg: DictConfig, registry: Registry) -> RunResult:
    """Train and evaluate one configured run; report through the lifecycle hooks."""
    seed_everything(cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = pick_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)

    ds = registry.spec("dataset", cfg.data.dataset)
    train_all = ds.loader("train", cfg.data)
    train_tweets = sample_shots(train_all, cfg.data.shots, cfg.seed)
    dev_tweets = ds.loader("dev", cfg.data)
    test_ds = registry.spec("dataset", cfg.data.eval_dataset) if cfg.data.eval_dataset else ds
    test_tweets = test_ds.loader("test", cfg.data)

    run_name = cfg.run_name or default_run_name(cfg)
    out_dir = unique_dir(Path(cfg.output_dir), run_name)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    if cfg.data.shots is not None:
        (out_dir / "shots.txt").write_text("".join(f"{t.imgid}\n" for t in train_tweets))

    model = build_model(cfg, registry).to(device)
    ctx = RunContext(cfg, out_dir, run_name, registry)
    ctx.params = model.parameter_counts()
    ctx.tags.update({"method": cfg.method, "dataset": cfg.data.dataset, "device": device.type,
                     "text_encoder": cfg.text_encoder.name if "name" in cfg.text_encoder else cfg.text_encoder.type})
    if cfg.data.eval_dataset:
        ctx.tags.update({"cross_domain": "true", "eval_dataset": cfg.data.eval_dataset})
    if getattr(model.text_encoder, "random_init", False):
        ctx.tags["text_weights"] = "random"
    image_provider = None
    if getattr(model.aligner, "uses_images", False):
        image_provider = _image_provider(cfg, model, ctx)
    batcher = Batcher(model.text_encoder.tokenizer.pad_token_id, image_provider)

    enc_train = encode_split(train_tweets, model, cfg.data.max_length)
    enc_dev = encode_split(dev_tweets, model, cfg.data.max_length)
    enc_test = encode_split(test_tweets, model, cfg.data.max_length)

    steps_per_epoch = math.ceil(len(enc_train) / cfg.train.batch_size)
    total = steps_per_epoch * cfg.train.epochs
    opt, sched = make_optimizer(model, cfg, total)
    shuffle_rng = random.Random(cfg.seed)

    registry.hook.mner_bench_run_start(run=ctx)
    try:
        best_f1, best_epoch, best_state, best_dev = -1.0, 0, None, None
        for epoch in range(1, cfg.train.epochs + 1):
            model.train()
            registry.hook.mner_bench_epoch_start(run=ctx, epoch=epoch, num_steps=steps_per_epoch)
            sums: dict[str, float] = {}
            n_steps = 0
            for step, batch in enumerate(batcher.iterate(enc_train, cfg.train.batch_size, shuffle_rng), 1):
                batch = batch.to(device)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    out = model(batch)
                loss = out.loss
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the training loss became {float(loss)} at epoch {epoch}, step {step}; "
                        f"try a lower train.lr / train.head_lr. The last good checkpoint is kept in {out_dir}."
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                opt.step()
                sched.step()
                n_steps += 1
                sums["train_loss"] = sums.get("train_loss", 0.0) + float(loss.detach())
                for k, v in out.parts.items():
                    if k != "loss_decoder":
                        sums[k] = sums.get(k, 0.0) + v
                registry.hook.mner_bench_step_end(run=ctx, epoch=epoch, step=step, loss=float(loss.detach()))
            dev_scores, _ = evaluate(model, batcher, enc_dev, cfg, device, amp, ctx, "dev")
            metrics = {k: v / max(n_steps, 1) for k, v in sums.items()}
            metrics["dev_f1"] = dev_scores.f1
            if dev_scores.f1 > best_f1:
                best_f1, best_epoch, best_dev = dev_scores.f1, epoch, dev_scores
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                if cfg.train.save_checkpoint:
                    (out_dir / "checkpoints").mkdir(exist_ok=True)
                    _atomic_torch_save({"model": best_state, "epoch": epoch, "dev_f1": best_f1},
                                       out_dir / "checkpoints" / "best.pt")
            metrics["best_dev_f1"] = best_f1
            registry.hook.mner_bench_epoch_end(run=ctx, epoch=epoch, metrics=metrics)

        # Test the checkpoint chosen on dev (never the best test score over epochs).
        model.load_state_dict(best_state)
        test_scores, test_pred = evaluate(model, batcher, enc_test, cfg, device, amp, ctx, "test")
        final: dict[str, float] = {}
        final.update(test_scores.as_metrics("test"))
        final["dev_f1"] = best_dev.f1
        final["best_epoch"] = best_epoch
        final["test_words_unseen"] = enc_test.words_unseen
        final.update({k: float(v) for k, v in ctx.params.items()})
        final["train_tweets"] = len(enc_train)
        if cfg.tracking.measure_speed:
            final.update(measure_speed(model, batcher, enc_test, device, amp, cfg.tracking.speed_tweets))
        final.update(ctx.extras.get("final_metrics", {}))

        pred_path = out_dir / "predictions.txt"
        write_conll(test_tweets, pred_path, test_pred)
        metrics_path = out_dir / "metrics.json"
        _write_json({
            "test": {"precision": test_scores.precision, "recall": test_scores.recall, "f1": test_scores.f1,
                     "per_type": test_scores.per_type, "counts": test_scores.counts},
            "dev": {"precision": best_dev.precision, "recall": best_dev.recall, "f1": best_dev.f1,
                    "per_type": best_dev.per_type},
            "metrics": final,
        }, metrics_path)
        artifacts = {"config": out_dir / "config.yaml", "predictions": pred_path, "metrics": metrics_path}
        if cfg.data.shots is not None:
            artifacts["shots"] = out_dir / "shots.txt"
        result = RunResult(final, artifacts, best_dev, test_scores, best_epoch, out_dir)
        registry.hook.mner_bench_run_finish(run=ctx, result=result)
        result.tracking_id = ctx.extras.get("mlflow_run_id")
        result.tracking_uri = ctx.extras.get("mlflow_uri")
        return result
    except BaseException as exc:
        registry.hook.mner_bench_run_failed(run=ctx, error=exc)
        raise


def _image_provider(cfg: DictConfig, model: MnerModel, ctx: RunContext):
    """Image loading for multimodal aligners (provided by the images module when present)."""
    try:
        from .images import make_image_provider
    except ImportError:
        raise MnerBenchError(f"method '{cfg.method}' needs images, but image support is not installed") from None
    return make_image_provider(cfg, model, ctx)
