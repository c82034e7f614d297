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
from dataclasses import asdict, dataclass, field
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
    """Turns a split into :class:`Batch` es; loads images when the aligner uses them (with an
    ``image_provider``) and the caller asks for them (``images``: see
    :meth:`~mner_bench.model.Aligner.needs_images`)."""

    def __init__(self, pad_id: int, image_provider: Any | None = None):
        self.pad_id = pad_id
        self.image_provider = image_provider

    def __call__(self, split: EncodedSplit, indices: Sequence[int], labelled: bool = True, images: bool = True) -> Batch:
        tweets = [split.tweets[i] for i in indices]
        text = collate_text([split.encoded[i] for i in indices], self.pad_id)
        tags = None
        if labelled:
            tags = torch.zeros(text.word_starts.shape, dtype=torch.long)
            for b, tw in enumerate(tweets):
                tags[b, : len(tw.tags)] = torch.tensor(encode_tags(tw.tags))
        pixels = image_mask = crops = crop_mask = None
        if self.image_provider is not None and images:
            pixels, image_mask = self.image_provider(tweets)
            with_crops = getattr(self.image_provider, "crops", None)
            got = with_crops(tweets) if with_crops is not None else None
            if got is not None:
                crops, crop_mask = got
        return Batch([t.imgid for t in tweets], text, tags, pixels, image_mask, crops, crop_mask)

    def iterate(self, split: EncodedSplit, batch_size: int, shuffle_rng: random.Random | None = None,
                images: bool = True) -> Iterator[Batch]:
        order = list(range(len(split)))
        if shuffle_rng is not None:
            shuffle_rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield self(split, order[i : i + batch_size], images=images)


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


def build_model(cfg: DictConfig, registry: Registry, inference: bool = False,
                state: dict[str, torch.Tensor] | None = None) -> MnerModel:
    """Build a method's model from its resolved config.

    With ``inference=True``, an aligner that runs on text alone at inference (see
    :attr:`~mner_bench.registry.ComponentSpec.text_only_inference`) is built without the visual
    encoder, its factory called with ``inference=True`` and ``state`` (the weights about to be
    loaded, or None) to size itself from; ``model.skipped_at_inference`` then names the
    state-dict prefixes left out.
    """
    text = registry.create_component("text_encoder", cfg.text_encoder.type, cfg.text_encoder)
    aligner_spec = registry.spec("aligner", cfg.aligner.type)
    text_only = inference and aligner_spec.text_only_inference is not None and aligner_spec.text_only_inference(cfg.aligner)
    visual = None
    if cfg.visual_encoder is not None and not text_only:
        visual = registry.create_component("visual_encoder", cfg.visual_encoder.type, cfg.visual_encoder)
    extra = {"inference": True, "state": state} if text_only else {}
    aligner = aligner_spec.factory(cfg.aligner, text_encoder=text, visual_encoder=visual, **extra)
    decoder = registry.create_component(
        "decoder", cfg.decoder.type, cfg.decoder, input_size=aligner.output_size, num_tags=len(TAGS), labels=TAGS
    )
    model = MnerModel(text, aligner, decoder, visual)
    model.skipped_at_inference = ["visual_encoder."] + list(getattr(aligner, "skipped_at_inference", [])) if text_only else []
    return model


def make_optimizer(model: MnerModel, cfg: DictConfig, total_steps: int):
    """AdamW with the encoders (and the aligner's :meth:`~mner_bench.model.Aligner.encoder_lr_modules`)
    at ``train.lr`` and everything else at ``train.head_lr``; no weight decay on biases and
    LayerNorm weights; linear warm-up then linear decay."""
    from transformers import get_linear_schedule_with_warmup

    slow = [model.text_encoder, model.visual_encoder, *model.aligner.encoder_lr_modules()]
    encoder_ids = {id(p) for m in slow if m is not None for p in m.parameters()}
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
    images = model.aligner.needs_images(training=False)
    for batch in batcher.iterate(split, batch_size, images=images):
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
    images = model.aligner.needs_images(training=False)

    def run_batch(ix):
        batch = batcher(split, ix, labelled=False, images=images).to(device)
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


@dataclass
class TrainState:
    """What a resumed run needs besides the model, optimizer and scheduler states."""

    epoch: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    best_dev: dict | None = None


def _rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def locate_run(target: str | Path, tracking_uri: str | None = None) -> Path:
    """The output folder of a run given as that folder or as an MLflow run id (its ``output_dir`` tag)."""
    path = Path(target)
    if path.is_dir():
        return path
    try:
        from .tracking import connect, resolve_uri

        return Path(connect(resolve_uri(tracking_uri)).get_run(str(target)).data.tags["output_dir"])
    except Exception as exc:
        raise ConfigError(f"'{target}' is neither a run's output folder nor an MLflow run id of this store ({exc})") from None


def resolve_resume(target: str, tracking_uri: str | None = None) -> Path:
    """The output folder of a run to resume (see :func:`locate_run`); it must hold ``last.pt``."""
    folder = locate_run(target, tracking_uri)
    if not (folder / "checkpoints" / "last.pt").exists():
        raise ConfigError(f"--resume {target}: {folder} has no checkpoints/last.pt to resume from "
                          f"(the run finished, or ran with train.save_checkpoint=false)")
    return folder


def run(cfg: DictConfig, registry: Registry, resume: Path | None = None) -> RunResult:
    """Train and evaluate one configured run; report through the lifecycle hooks.

    With ``resume`` (an output folder holding ``checkpoints/last.pt``), the run continues after
    the last finished epoch with the model, optimizer, scheduler and random states it had, in the
    same folder and the same MLflow run, and ends exactly as an uninterrupted run would.
    """
    seed_everything(cfg.seed)
    threads = os.environ.get("MNER_BENCH_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    device = pick_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)

    ds = registry.spec("dataset", cfg.data.dataset)
    train_all = ds.loader("train", cfg.data)
    train_tweets = sample_shots(train_all, cfg.data.shots, cfg.seed)
    dev_tweets = ds.loader("dev", cfg.data)
    test_ds = registry.spec("dataset", cfg.data.eval_dataset) if cfg.data.eval_dataset else ds
    test_tweets = test_ds.loader("test", cfg.data)

    checkpoint = None
    if resume is None:
        run_name = cfg.run_name or default_run_name(cfg)
        out_dir = unique_dir(Path(cfg.output_dir), run_name)
        OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
        if cfg.data.shots is not None:
            (out_dir / "shots.txt").write_text("".join(f"{t.imgid}\n" for t in train_tweets))
    else:
        out_dir = Path(resume)
        checkpoint = torch.load(out_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        run_name = checkpoint["run_name"]
        if cfg.data.shots is not None:
            saved = (out_dir / "shots.txt").read_text().split()
            if saved != [t.imgid for t in train_tweets]:
                raise MnerBenchError(f"{out_dir}/shots.txt does not match the training subset drawn now; "
                                     f"the data changed since the run started")

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
    state = TrainState()
    best_state = None
    ckpt_dir = out_dir / "checkpoints"
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        sched.load_state_dict(checkpoint["scheduler"])
        shuffle_rng.setstate(checkpoint["shuffle_rng"])
        _set_rng_states(checkpoint["rng"])
        state = TrainState(**checkpoint["state"])
        best_state = torch.load(ckpt_dir / "best.pt", map_location="cpu", weights_only=False)["model"]
        ctx.extras["resume_run_id"] = checkpoint.get("mlflow_run_id")
        ctx.tags["resumed_from_epoch"] = str(state.epoch)

    registry.hook.mner_bench_run_start(run=ctx)
    try:
        for epoch in range(state.epoch + 1, cfg.train.epochs + 1):
            metrics = _train_epoch(model, batcher, enc_train, cfg, device, amp, opt, sched, shuffle_rng, ctx, epoch)
            dev_scores, _ = evaluate(model, batcher, enc_dev, cfg, device, amp, ctx, "dev")
            metrics["dev_f1"] = dev_scores.f1
            state.epoch = epoch
            if dev_scores.f1 > state.best_f1:
                state.best_f1, state.best_epoch = dev_scores.f1, epoch
                state.best_dev = _scores_dict(dev_scores)
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                if cfg.train.save_checkpoint:
                    ckpt_dir.mkdir(exist_ok=True)
                    _atomic_torch_save({"model": best_state, "epoch": epoch, "dev_f1": state.best_f1}, ckpt_dir / "best.pt")
            metrics["best_dev_f1"] = state.best_f1
            if cfg.train.save_checkpoint:
                _atomic_torch_save({
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "shuffle_rng": shuffle_rng.getstate(), "rng": _rng_states(), "state": asdict(state),
                    "run_name": run_name, "mlflow_run_id": ctx.extras.get("mlflow_run_id"),
                }, ckpt_dir / "last.pt")
            with open(out_dir / "history.jsonl", "a") as fh:
                fh.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
            registry.hook.mner_bench_epoch_end(run=ctx, epoch=epoch, metrics=metrics)

        # Test the checkpoint chosen on dev (never the best test score over epochs).
        model.load_state_dict(best_state)
        result = _finish(model, batcher, cfg, device, amp, ctx, state, enc_train, enc_test, test_tweets)
        registry.hook.mner_bench_run_finish(run=ctx, result=result)
        if not cfg.train.keep_last:
            (ckpt_dir / "last.pt").unlink(missing_ok=True)  # finished: nothing to resume; best.pt stays
        result.tracking_id = ctx.extras.get("mlflow_run_id")
        result.tracking_uri = ctx.extras.get("mlflow_uri")
        return result
    except BaseException as exc:
        registry.hook.mner_bench_run_failed(run=ctx, error=exc)
        raise


def _train_epoch(model, batcher, enc_train, cfg, device, amp, opt, sched, shuffle_rng, ctx, epoch) -> dict[str, float]:
    """One epoch of optimizer steps; returns the epoch's mean loss and mean auxiliary parts."""
    model.train()
    steps = math.ceil(len(enc_train) / cfg.train.batch_size)
    ctx.hook.mner_bench_epoch_start(run=ctx, epoch=epoch, num_steps=steps)
    sums: dict[str, float] = {}
    n_steps = 0
    for step, batch in enumerate(batcher.iterate(enc_train, cfg.train.batch_size, shuffle_rng), 1):
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(batch)
        loss = out.loss
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the training loss became {loss.item()} at epoch {epoch}, step {step}; try a lower "
                f"train.lr / train.head_lr. The last good checkpoint is kept in {ctx.output_dir / 'checkpoints'}."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        n_steps += 1
        value = float(loss.detach())
        sums["train_loss"] = sums.get("train_loss", 0.0) + value
        for k, v in out.parts.items():
            if k != "loss_decoder":
                sums[k] = sums.get(k, 0.0) + v
        ctx.hook.mner_bench_step_end(run=ctx, epoch=epoch, step=step, loss=value)
    return {k: v / max(n_steps, 1) for k, v in sums.items()}


def _scores_dict(s: Scores) -> dict:
    return {"precision": s.precision, "recall": s.recall, "f1": s.f1, "per_type": s.per_type, "counts": s.counts}


def missing_image_scores(model, batcher, split, cfg, device, amp, test_scores: Scores) -> dict[str, float]:
    """Test scores with every image replaced by a uniform empty image (``test_f1_empty_image``)
    and with every image absent (``test_f1_no_image``) — the paper's Table 7 protocols.

    An aligner that reads no images at evaluation (``needs_images(training=False)`` False, e.g.
    image-free ``bga``) is not run again: its predictions cannot depend on the images, so both
    equal ``test_scores``."""
    from .images import FixedImageProvider

    ip = batcher.image_provider
    out = {}
    for mode, name in (("empty", "empty_image"), ("none", "no_image")):
        if model.aligner.needs_images(training=False):
            fixed = Batcher(batcher.pad_id, FixedImageProvider(ip.image_size, ip.mean, ip.std, mode))
            scores, _ = evaluate(model, fixed, split, cfg, device, amp)
        else:
            scores = test_scores
        out.update({f"test_f1_{name}": scores.f1, f"test_precision_{name}": scores.precision,
                    f"test_recall_{name}": scores.recall})
    return out


def _finish(model, batcher, cfg, device, amp, ctx, state, enc_train, enc_test, test_tweets) -> RunResult:
    """Score the test set with the selected model; write predictions and metrics."""
    test_scores, test_pred = evaluate(model, batcher, enc_test, cfg, device, amp, ctx, "test")
    best_dev = Scores(**state.best_dev)
    final: dict[str, float] = {}
    final.update(test_scores.as_metrics("test"))
    final["dev_f1"] = best_dev.f1
    final["best_epoch"] = state.best_epoch
    final["test_words_unseen"] = enc_test.words_unseen
    final.update({k: float(v) for k, v in ctx.params.items()})
    final["train_tweets"] = len(enc_train)
    if cfg.tracking.measure_speed:
        final.update(measure_speed(model, batcher, enc_test, device, amp, cfg.tracking.speed_tweets))
    if batcher.image_provider is not None and cfg.train.eval_missing_images:
        final.update(missing_image_scores(model, batcher, enc_test, cfg, device, amp, test_scores))
    final.update(ctx.extras.get("final_metrics", {}))

    out_dir = ctx.output_dir
    pred_path = out_dir / "predictions.txt"
    write_conll(test_tweets, pred_path, test_pred)
    metrics_path = out_dir / "metrics.json"
    _write_json({"test": _scores_dict(test_scores), "dev": state.best_dev, "metrics": final}, metrics_path)
    artifacts = {"config": out_dir / "config.yaml", "predictions": pred_path, "metrics": metrics_path,
                 "history": out_dir / "history.jsonl"}
    if cfg.data.shots is not None:
        artifacts["shots"] = out_dir / "shots.txt"
    return RunResult(final, artifacts, best_dev, test_scores, state.best_epoch, out_dir)


def _image_provider(cfg: DictConfig, model: MnerModel, ctx: RunContext):
    """Image loading for multimodal aligners (provided by the images module when present)."""
    try:
        from .images import make_image_provider
    except ImportError:
        raise MnerBenchError(f"method '{cfg.method}' needs images, but image support is not installed") from None
    return make_image_provider(cfg, model, ctx)
