"""Alignment analysis of a trained BGA-MNER run (the paper's Figure 3): are the visual
features generated from a tweet's text closer to its own image than to other images?

For every tweet of the chosen split that has a valid image, the trained model runs its BGA
layers in eval mode with the visual branch on (``mode=generate``: both generators, the visual
stream as in training, no dropout, SCS argmax). At each BGA layer l this gives

* ``V_hat_i^l [N_v, d_v]``, generated from tweet i's text alone (image-free inference uses it);
* ``V_j^l [N_v, d_v]``, the visual stream of image j, which depends on image j alone (its
  extractor attends to ``T_hat`` generated from the image itself).

``sim[i, j]`` is the cosine similarity between ``V_hat_i`` and ``V_j`` (``pool=tokens``: the
token-by-token features flattened, position against position as Eq. 5 compares them;
``pool=mean``: averaged over the tokens), averaged over the N layers. With ``center=True``
(the default) each layer's generated features and real features are first centred on their
own mean over the analysed tweets: every image (and every generated feature) shares a large
common component (position embeddings, biases, the queries themselves) that dominates the
cosine and hides what differs from tweet to tweet, which is what the ranking is about.
Reported:

Pixel-identical images (after preprocessing) are one image: tweets that share a picture (on
``synth-consistent`` every tweet naming the same entity; retweets on real data) cannot be told
apart by their images, so an identical copy of the own image counts as the own image, never as
a competitor (:func:`image_groups`).

* ``align_top1``: fraction of tweets whose own image is the most similar of all images;
  ``align_top1_chance`` = 1 / number of distinct images (``align_images``);
* ``align_pairwise``: fraction of (tweet, other image) pairs where the own image is the more
  similar (0.5 = chance), a rank measure that does not need a unique best image;
* ``align_top1_same_label``: where tweets carry an image label (the generated ``synth-*``
  sets), the fraction whose most similar image has the own image's label;
  ``align_top1_same_label_chance`` is its value for a best image drawn at random. On
  ``synth-ambiguous`` this is the figure that can show alignment: each image's jitter
  (position, size, shade, background) is drawn at random per tweet, so nothing in the text can
  single out the own image among the other images of its type. On ``synth-consistent`` each
  name has one picture, so ``align_top1`` itself is reachable;
* ``align_top1_other_labels``: with image labels, the fraction of tweets whose own image is more
  similar than every image of another label, i.e. ``align_top1`` with the own label's other
  images (the same picture up to jitter) left out of the competition, as retrieval benchmarks
  count duplicates of the target; ``align_top1_other_labels_chance`` is its value for random
  similarities (1 / (1 + number of images of other labels), averaged over the tweets);
* ``align_sim_own`` / ``align_sim_other``: mean similarity to the own image / to the others;
* the same per layer, suffixed ``_l{l}``.

Results are printed, written to ``<run>/alignment.json`` and ``alignment.png`` (histograms of
own vs other similarities), and logged to the run's MLflow run (metrics and both files). Another
split than test writes ``alignment_<split>.json`` / ``.png`` and logs ``<split>_align_*``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mner_bench.errors import ConfigError, MnerBenchError

log = logging.getLogger(__name__)


@dataclass
class AlignmentResult:
    metrics: dict[str, float]
    tweets: int
    split: str
    pool: str
    center: bool
    output_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    checkpoint: str = "best"
    epoch: int | None = None


def load_run(run_dir: Path, registry, checkpoint: str | Path | None = None):
    """(resolved config, model with the best checkpoint's weights or ``checkpoint``'s, the
    checkpoint's path, its epoch) of a bga run's folder; the checkpoint file is read once."""
    from mner_bench.evaluate import model_from_checkpoint, read_checkpoint, run_config

    cfg = run_config(run_dir, registry)
    if cfg.aligner.type != "bga" or not cfg.aligner.mcg:
        raise ConfigError(f"{run_dir / 'config.yaml'}: the alignment analysis needs a run of the bga aligner with "
                          f"aligner.mcg=true (this run has aligner.type={cfg.aligner.type})")
    path, contents = read_checkpoint(run_dir, checkpoint)
    epoch = contents.get("epoch", contents.get("state", {}).get("epoch"))  # best.pt / last.pt
    return cfg, model_from_checkpoint(cfg, registry, path, contents), path, epoch


def similarity(generated: list[torch.Tensor], real: list[torch.Tensor], pool: str,
               center: bool = True) -> list[torch.Tensor]:
    """Per layer, ``[n, n]`` cosine similarities of generated ``[n, N_v, d]`` vs real features
    (each centred on its mean over the ``n`` tweets with ``center``)."""
    out = []
    for g, r in zip(generated, real, strict=True):
        g, r = g.float(), r.float()
        if center:
            g, r = g - g.mean(0, keepdim=True), r - r.mean(0, keepdim=True)
        if pool == "mean":
            g, r = g.mean(1), r.mean(1)
        elif pool == "tokens":
            g, r = g.flatten(1), r.flatten(1)
        else:
            raise ConfigError(f"--pool must be 'tokens' or 'mean', got '{pool}'")
        out.append(F.normalize(g.float(), dim=-1) @ F.normalize(r.float(), dim=-1).T)
    return out


def image_groups(images: torch.Tensor) -> list[bytes]:
    """One key per image of ``images [B, ...]``: equal keys for pixel-identical images."""
    flat = images.detach().to("cpu").contiguous().view(images.size(0), -1)
    return [hashlib.sha256(row.numpy().tobytes()).digest() for row in flat]


def same_image(n: int, groups: list | None = None) -> torch.Tensor:
    """``[n, n]`` bool: image j is tweet i's own image or a pixel-identical copy of it (the
    diagonal alone without ``groups``)."""
    if groups is None:
        return torch.eye(n, dtype=torch.bool)
    ids = {g: k for k, g in enumerate(dict.fromkeys(groups))}
    gid = torch.tensor([ids[g] for g in groups])
    return gid[:, None] == gid[None, :]


def summarise(sim: torch.Tensor, labels: list[str | None] | None = None, suffix: str = "",
              groups: list | None = None) -> dict[str, float]:
    """The metrics of one ``[n, n]`` similarity matrix (row i: tweet i's generated features).

    ``groups`` (one hashable per tweet, e.g. :func:`image_groups`): tweets whose images are
    pixel-identical share a group, and an identical copy of the own image counts as the own
    image (it cannot be told apart from it): it is neither a competitor nor an "other" image."""
    n = sim.size(0)
    own = sim.diagonal()
    same = same_image(n, groups)
    off = ~same
    m = {
        f"align_top1{suffix}": float(same[torch.arange(n), sim.argmax(1)].float().mean()),
        f"align_pairwise{suffix}": float((own[:, None] > sim)[off].float().mean()) if off.any() else float("nan"),
        f"align_sim_own{suffix}": float(own.mean()),
        f"align_sim_other{suffix}": float(sim[off].mean()) if off.any() else float("nan"),
    }
    if labels is not None and all(lab is not None for lab in labels):
        best = sim.argmax(1).tolist()
        m[f"align_top1_same_label{suffix}"] = sum(labels[b] == labels[i] for i, b in enumerate(best)) / n
        if not suffix and n > 1:  # a best image drawn at random among the others
            m["align_top1_same_label_chance"] = sum((labels.count(lab) - 1) / (n - 1) for lab in labels) / n
        other = torch.tensor([[a != b for b in labels] for a in labels])  # [n, n]: image j has another label
        beaten = (sim >= own[:, None]) & other  # a tie with an image of another label counts against
        m[f"align_top1_other_labels{suffix}"] = float((~beaten.any(1)).float().mean())
        if not suffix:
            m["align_top1_other_labels_chance"] = float((1.0 / (1.0 + other.sum(1).float())).mean())
    return m


def _plot(sim: torch.Tensor, path: Path, title: str, groups: list | None = None) -> None:
    """Histograms of the own-image and the other-image similarities; copies of the own image
    (same ``groups`` key) are the own image, as in :func:`summarise`, not "other images"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off = ~same_image(sim.size(0), groups)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    if off.any():
        ax.hist(sim[off].numpy(), bins=40, alpha=0.6, density=True, label="other images")
    ax.hist(sim.diagonal().numpy(), bins=40, alpha=0.6, density=True, label="own image")
    ax.set_xlabel("cosine(generated visual, real visual)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _log_to_mlflow(cfg, run_dir: Path, metrics: dict[str, float], files: list[Path], tracking_uri: str | None,
                   step: int = 0) -> str | None:
    """Log to the MLflow run whose ``output_dir`` tag is ``run_dir``; None when there is none."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from mner_bench.tracking import tracking_uri as run_uri

    uri = tracking_uri or run_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    # the run's tag holds the absolute folder; run_dir may be given relative to the working folder
    runs = client.search_runs(exps, filter_string=f"tags.output_dir = '{run_dir.resolve()}'", max_results=5) if exps else []
    if not runs:
        log.warning("no MLflow run in %s has output_dir %s: results not logged there", uri, run_dir)
        return None
    run_id = runs[0].info.run_id
    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v == v]  # NaN-free
    client.log_batch(run_id, metrics=ms)
    for f in files:
        client.log_artifact(run_id, str(f))
    return run_id


@torch.no_grad()
def analyze_alignment(run: str, registry=None, split: str = "test", pool: str = "tokens", batch_size: int = 32,
                      max_tweets: int | None = None, tracking_uri: str | None = None,
                      log_mlflow: bool = True, center: bool = True,
                      checkpoint: str | Path | None = None) -> AlignmentResult:
    """Run the analysis on a trained run (folder or MLflow run id); see the module docstring.

    ``checkpoint``: a checkpoint file of the run to analyse instead of the best dev epoch's
    ``checkpoints/best.pt`` (e.g. its ``checkpoints/last.pt``, kept by runs with
    ``train.keep_last=true``); the metrics are logged at the step of the checkpoint's epoch."""
    from mner_bench.evaluate import split_tweets
    from mner_bench.images import make_image_provider
    from mner_bench.predict import run_folder
    from mner_bench.registry import get_registry
    from mner_bench.training import Batcher, RunContext, encode_split

    registry = registry or get_registry()
    run_dir = run_folder(run, tracking_uri)
    cfg, model, ckpt_path, epoch = load_run(run_dir, registry, checkpoint)
    _, tweets = split_tweets(cfg, registry, split)
    ctx = RunContext(cfg, run_dir, run_dir.name, registry)
    provider = make_image_provider(cfg, model, ctx)
    from mner_bench.images import FOUND

    tweets = [t for t in tweets if provider.lookup(t.imgid)[0] == FOUND]
    if max_tweets:
        tweets = tweets[:max_tweets]
    if len(tweets) < 2:
        raise MnerBenchError(f"the alignment analysis needs at least 2 {split} tweets with an image; found "
                             f"{len(tweets)} (give the run's image folder with data.image_dir / --image-dir?)")
    enc = encode_split(tweets, model, cfg.data.max_length)
    batcher = Batcher(model.text_encoder.tokenizer.pad_token_id, provider)
    aligner = model.aligner
    gen: list[list[torch.Tensor]] = [[] for _ in range(aligner.num_bga_layers)]
    real: list[list[torch.Tensor]] = [[] for _ in range(aligner.num_bga_layers)]
    groups: list[bytes] = []
    for batch in batcher.iterate(enc, batch_size):
        groups += image_groups(batch.images if batch.crops is None else
                               torch.cat([batch.images.flatten(1), batch.crops.flatten(1)], 1))
        s = aligner.streams(batch, model.text_encoder, model.visual_encoder, mode="generate")
        for layer in range(aligner.num_bga_layers):
            gen[layer].append(s.generated_visual[layer].float())
            real[layer].append(s.real_visual[layer].float())
    per_layer = similarity([torch.cat(g) for g in gen], [torch.cat(r) for r in real], pool, center)
    sim = torch.stack(per_layer).mean(0)
    labels = [t.image_label for t in tweets]
    metrics = summarise(sim, labels, groups=groups)
    images = len(set(groups))
    metrics["align_top1_chance"] = 1.0 / images
    metrics["align_tweets"] = float(len(tweets))
    metrics["align_images"] = float(images)
    for layer, s in enumerate(per_layer):
        metrics.update(summarise(s, labels, f"_l{layer}", groups))
    # the test split (the paper's Figure 3) keeps the plain names; another split gets its own
    # files and metric names, so that analysing it never overwrites the test figures
    stem = "alignment" if split == "test" else f"alignment_{split}"
    files = {"json": run_dir / f"{stem}.json", "png": run_dir / f"{stem}.png"}
    files["json"].write_text(json.dumps({"split": split, "pool": pool, "center": center, "tweets": len(tweets),
                                         "checkpoint": str(ckpt_path), "epoch": epoch, "metrics": metrics},
                                        indent=2, sort_keys=True) + "\n")
    _plot(sim, files["png"], f"{run_dir.name}: {split}, {len(tweets)} tweets ({images} images), "
          f"pool={pool}{', centred' if center else ''}", groups)
    logged = metrics if split == "test" else {f"{split}_{k}": v for k, v in metrics.items()}
    run_id = (_log_to_mlflow(cfg, run_dir, logged, list(files.values()), tracking_uri, step=epoch or 0)
              if log_mlflow else None)
    return AlignmentResult(metrics, len(tweets), split, pool, center, run_dir, files, run_id, str(ckpt_path), epoch)


def format_result(res: AlignmentResult) -> str:
    m = res.metrics
    lines = [
        f"alignment of generated vs real visual features: {res.output_dir.name}, {res.split} split, "
        f"{res.tweets} tweets with an image, pool={res.pool}{', centred' if res.center else ', not centred'}; "
        f"weights {res.checkpoint} (epoch {res.epoch})",
        f"  own image ranked first: {m['align_top1']:.3f} (chance {m['align_top1_chance']:.3f})",
        f"  own image more similar than another image (pairs): {m['align_pairwise']:.3f} (chance 0.5)",
    ]
    if "align_top1_same_label" in m:
        lines.append(f"  most similar image has the own image's label: {m['align_top1_same_label']:.3f}"
                     f" (chance {m.get('align_top1_same_label_chance', float('nan')):.3f})")
        lines.append(f"  own image more similar than every image of another label: {m['align_top1_other_labels']:.3f}"
                     f" (chance {m.get('align_top1_other_labels_chance', float('nan')):.3f})")
    lines.append(f"  mean similarity: own {m['align_sim_own']:.4f}, other {m['align_sim_other']:.4f}")
    layers = sorted({int(k.rsplit('_l', 1)[1]) for k in m if k.startswith("align_top1_l")})
    for layer in layers:
        lines.append(f"  layer {layer}: top1 {m[f'align_top1_l{layer}']:.3f}, pairwise {m[f'align_pairwise_l{layer}']:.3f}, "
                     f"sim own {m[f'align_sim_own_l{layer}']:.4f} / other {m[f'align_sim_other_l{layer}']:.4f}")
    lines.append(f"  written: {', '.join(str(p) for p in res.files.values())}")
    lines.append(f"  MLflow run: {res.mlflow_run_id}" if res.mlflow_run_id else "  MLflow run: not found, not logged")
    return "\n".join(lines)
