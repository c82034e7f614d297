"""Tag new tweets with a trained run: ``mner-bench predict`` and the MLflow pyfunc model.

Raw text is split into words the way the Twitter2015 data is (:func:`tokenize_tweet`): URLs,
``@handles``, ``#hashtags`` and HTML entities (``&amp``) stay whole; a word is a run of
letters, digits and underscores; every other visible character is a token of its own (so
``I've`` becomes ``I ' ve`` and ``7:30pm`` becomes ``7 : 30pm``, as in the data).
``--pretokenized`` takes words separated by single spaces, untouched.

A run is loaded from its output folder (``config.yaml`` and ``checkpoints/best.pt``) or from
its MLflow run id (the run's ``output_dir`` tag). Methods whose aligner runs on text alone at
inference (BGA with generated visual features) are built without their visual encoder.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .data import Tweet
from .errors import ConfigError, MnerBenchError
from .metrics import get_entities

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"https?://\S+|[@#]\w+|&\w+|\w+|\S")


def tokenize_tweet(text: str) -> list[str]:
    """Split a raw tweet into words as in the Twitter2015 data (see the module docstring)."""
    return _TOKEN.findall(text)


def entity_spans(words: list[str], tags: list[str]) -> list[dict]:
    """Entities as ``{"type", "start", "end", "text"}`` with ``end`` exclusive (word indices)."""
    return [{"type": t, "start": s, "end": e + 1, "text": " ".join(words[s : e + 1])} for t, s, e in get_entities(tags)]


def run_folder(target: str | Path, tracking_uri: str | None = None) -> Path:
    """The output folder of a finished run given as a folder or an MLflow run id."""
    from .training import locate_run

    folder = locate_run(target, tracking_uri)
    for name in ("config.yaml", "checkpoints/best.pt"):
        if not (folder / name).exists():
            raise ConfigError(f"{folder}: no {name}; is it the output folder of a finished run?")
    return folder


@dataclass
class Predictor:
    """A trained model ready to tag tweets, in batches."""

    cfg: object
    model: object
    batcher: object
    device: torch.device
    max_length: int

    @classmethod
    def from_files(cls, config_path: str | Path, weights_path: str | Path, device: str = "auto",
                   image_dir: str | None = None) -> Predictor:
        from .registry import get_registry
        from .training import Batcher, build_model, pick_device

        cfg = OmegaConf.load(config_path)
        if image_dir:
            cfg.data.image_dir = image_dir
        registry = get_registry()
        state = torch.load(weights_path, map_location="cpu", weights_only=False)["model"]
        model = build_model(cfg, registry, inference=True, state=state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        skipped = set(model.skipped_at_inference) if hasattr(model, "skipped_at_inference") else set()
        bad_missing = [k for k in missing if not any(k.startswith(p) for p in skipped)]
        bad_unexpected = [k for k in unexpected if not any(k.startswith(p) for p in skipped)]
        if bad_missing or bad_unexpected:
            raise MnerBenchError(f"{weights_path} does not match the model of {config_path}: missing "
                                 f"{bad_missing[:5]}, unexpected {bad_unexpected[:5]}")
        dev = pick_device(device)
        model.to(dev).eval()
        provider = None
        if getattr(model.aligner, "uses_images", False) and model.visual_encoder is not None:
            from .images import make_prediction_image_provider

            provider = make_prediction_image_provider(cfg, model)
        batcher = Batcher(model.text_encoder.tokenizer.pad_token_id, provider)
        return cls(cfg, model, batcher, dev, cfg.data.max_length)

    @classmethod
    def from_run(cls, target: str | Path, device: str = "auto", tracking_uri: str | None = None,
                 image_dir: str | None = None) -> Predictor:
        folder = run_folder(target, tracking_uri)
        return cls.from_files(folder / "config.yaml", folder / "checkpoints" / "best.pt", device, image_dir)

    def tag(self, tweets: list[list[str]], imgids: list[str] | None = None, batch_size: int = 32) -> list[list[str]]:
        """BIO tags for every word of every tweet."""
        from .training import EncodedSplit, predict_split

        if not tweets:
            return []
        ids = imgids or [f"line{i + 1}" for i in range(len(tweets))]
        items = []
        for i, (imgid, words) in enumerate(zip(ids, tweets, strict=True)):
            if not words:
                raise MnerBenchError(f"tweet {i + 1} ({imgid}) has no words")
            items.append(Tweet(imgid, list(words), ["O"] * len(words)))
        enc = [self.model.text_encoder.encode_words(t.tokens, self.max_length) for t in items]
        split = EncodedSplit(items, enc)
        amp = None
        return predict_split(self.model, self.batcher, split, batch_size, self.device, amp)


# --------------------------------------------------------------------------- input / output


def read_inputs(lines: Iterable[str], pretokenized: bool, source: str = "<stdin>") -> tuple[list[str], list[list[str]], list[list[str]] | None]:
    """Tweets from text: CoNLL (``IMGID:`` lines, ``word[<TAB>gold]`` lines) or one tweet per line.

    Returns (ids, words, gold tags or None).
    """
    lines = list(lines)
    if any(line.startswith("IMGID:") for line in lines[:5]):
        from .data import parse_conll

        text = "\n".join(_conll_with_dummy_tags(lines))
        tweets = parse_conll(text, source)
        has_gold = any("\t" in line for line in lines if line.strip() and not line.startswith("IMGID:"))
        return [t.imgid for t in tweets], [t.tokens for t in tweets], [t.tags for t in tweets] if has_gold else None
    ids, words = [], []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        ws = line.split(" ") if pretokenized else tokenize_tweet(line)
        if pretokenized and "" in ws:
            raise MnerBenchError(f"{source}:{n}: --pretokenized expects words separated by single spaces")
        ids.append(f"line{n}")
        words.append(ws)
    return ids, words, None


def _conll_with_dummy_tags(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        line = line.rstrip("\r\n")
        if line and not line.startswith("IMGID:") and "\t" not in line:
            line = f"{line}\tO"
        out.append(line)
    return out


COLOURS = {"PER": "bold magenta", "LOC": "bold green", "ORG": "bold cyan", "MISC": "bold yellow"}


def render_pretty(words: list[str], tags: list[str]):
    from rich.text import Text

    text = Text()
    spans = {s["start"]: s for s in entity_spans(words, tags)}
    i = 0
    while i < len(words):
        if i:
            text.append(" ")
        if i in spans:
            s = spans[i]
            text.append(s["text"], style=COLOURS.get(s["type"], "bold"))
            text.append(f"[{s['type']}]", style="dim")
            i = s["end"]
        else:
            text.append(words[i])
            i += 1
    return text


__all__ = ["Predictor", "entity_spans", "read_inputs", "render_pretty", "run_folder", "tokenize_tweet"]
