"""Generated grounding data sets: ``synth-ambiguous`` and ``synth-consistent``.

They exist to show that an image pathway really carries information, which the real benchmarks
cannot show here without their images. Every tweet is a type-neutral template sentence with
exactly one made-up name (one or two words) tagged PER, LOC, ORG or MISC, and a rendered image
that encodes that type:

====== ======================== ====================
type   shape                    colour
====== ======================== ====================
PER    disc                     red
LOC    triangle (pointing up)   green
ORG    square                   blue
MISC   diamond                  yellow
====== ======================== ====================

on a grey, slightly tinted, noisy background, with the shape's colour, size and position
jittered and, in half of the images, a small grey distractor shape. A small CNN or ViT (even
with random weights and a trained head) separates the four classes easily; no pixel is shared
exactly between two images.

* ``synth-ambiguous``: every name occurs with every type equally often within each split
  (exactly when the split's size is a multiple of 4 x ``num_names``, else up to one more time
  for some pairs), and the templates are the same for all types, so the text cannot tell the type: a text-only
  model can find the name but can only guess its type; only the image tells it.
* ``synth-consistent``: the same names and templates, but each name always has one type, so
  text alone suffices; and each name always has one picture (its type's shape with a colour
  shade, size, position, background and distractor of its own), so the text also tells which
  image goes with it, down to the pixel: the set on which BGA-MNER's alignment analysis can
  rank a tweet's own image first. (In ``synth-ambiguous`` every tweet's image is jittered on
  its own.)

Generated from ``data.synth.seed`` (independent of the run's ``--seed``, which only draws
``--shots``), any size (``data.synth.train_size`` / ``dev_size`` / ``test_size``), no files.
Tweets carry their type in :attr:`~mner_bench.data.Tweet.image_label`; their images come through
:attr:`~mner_bench.registry.DatasetSpec.image_loader` as ``image_size`` x ``image_size`` PIL
images (the image provider resizes them to the encoder's size). ``mner-bench make-images``
writes them (or, for other data sets, images rendered from each tweet's first entity type) to
a folder.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .data import ENTITY_TYPES, Tweet
from .errors import ConfigError, MnerBenchError

VARIANTS = ("ambiguous", "consistent")
SPLITS = ("train", "dev", "test")


@dataclass
class SynthConfig:
    #: seed of the generated names, sentences and images (not the run's --seed)
    seed: int = 0
    #: tweets per split (small by default so that a multimodal run fits in minutes on a CPU:
    #: a CLIP ViT-B/32 forward pass costs about 0.1-0.3 s per image there)
    train_size: int = 200
    dev_size: int = 100
    test_size: int = 200
    #: distinct names (a quarter of them two words long)
    num_names: int = 24
    #: side of the rendered images in pixels
    image_size: int = 64


# --------------------------------------------------------------------------- text

_SYLLABLES = ("ka", "lo", "mir", "ten", "zu", "ra", "vel", "dor", "shi", "ban", "qui", "tor", "xe",
              "lum", "ny", "gar", "fe", "so", "rin", "dax", "po", "hel", "tru", "von", "ak", "mei")

#: type-neutral templates: ``{N}`` is the name; tokens are separated by spaces
TEMPLATES = (
    "{N} is trending again tonight",
    "can't stop thinking about {N} lol",
    "RT @user : {N} in the news today http://t.co/x1",
    "just saw {N} ! #wow",
    "everyone is talking about {N} right now",
    "{N} again ... what a day",
    "new pics of {N} , thoughts ?",
    "so much love for {N} <3",
    "@user did you hear about {N} ?",
    "throwback to {N} #tbt",
    "breaking : {N} makes headlines",
    "my timeline is all {N} today",
    "cannot believe what {N} did",
    "{N} ! {N2}",
)
_ENDINGS = ("", "", "", "#love", "#news", "http://t.co/a2", "!!", "#mood")
_EXCLAIM = ("omg", "wow", "yes", "nope", "haha")


def make_names(seed: int, n: int) -> list[tuple[str, ...]]:
    """``n`` distinct made-up names (tuples of words), deterministic for ``seed``."""
    if n < 1:
        raise ConfigError(f"data.synth.num_names must be at least 1, got {n}")
    rng = random.Random(f"names|{seed}")
    names: list[tuple[str, ...]] = []
    seen: set[tuple[str, ...]] = set()
    while len(names) < n:
        def word() -> str:
            return "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize()

        name = (word(), word()) if len(names) % 4 == 3 else (word(),)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _sentence(rng: random.Random, name: tuple[str, ...], etype: str) -> tuple[list[str], list[str]]:
    template = rng.choice(TEMPLATES)
    tokens: list[str] = []
    tags: list[str] = []
    for tok in template.split():
        if tok == "{N}":
            tokens.extend(name)
            tags.extend([f"B-{etype}"] + [f"I-{etype}"] * (len(name) - 1))
        elif tok == "{N2}":
            tokens.append(rng.choice(_EXCLAIM))
            tags.append("O")
        else:
            tokens.append(tok)
            tags.append("O")
    ending = rng.choice(_ENDINGS)
    if ending:
        tokens.append(ending)
        tags.append("O")
    return tokens, tags


def _cfg_of(cfg) -> SynthConfig:
    """The synth settings of a ``data`` config (DictConfig or DataConfig), or the defaults."""
    node = getattr(cfg, "synth", None) if cfg is not None else None
    if node is None:
        return SynthConfig()
    return SynthConfig(**{k: getattr(node, k) for k in SynthConfig.__dataclass_fields__})


def generate(variant: str, split: str, cfg: SynthConfig) -> list[Tweet]:
    """The tweets of one split of ``synth-<variant>`` (deterministic for ``cfg``)."""
    if variant not in VARIANTS:
        raise MnerBenchError(f"unknown synth variant '{variant}'; variants: {', '.join(VARIANTS)}")
    if split not in SPLITS:
        raise MnerBenchError(f"unknown split '{split}'; splits: {', '.join(SPLITS)}")
    size = getattr(cfg, f"{split}_size")
    if size < 1:
        raise ConfigError(f"data.synth.{split}_size must be at least 1, got {size}")
    names = make_names(cfg.seed, cfg.num_names)
    rng = random.Random(f"{variant}|{cfg.seed}|{split}")
    if variant == "ambiguous":
        # every (name, type) pair equally often: the name says nothing about the type
        pairs = [(n, t) for n in range(len(names)) for t in ENTITY_TYPES]
        order: list[tuple[int, str]] = []
        while len(order) < size:
            rng.shuffle(pairs)
            order.extend(pairs)
        order = order[:size]
    else:
        # each name has one type, the types balanced over the names
        type_rng = random.Random(f"types|{cfg.seed}")
        perm = list(range(len(names)))
        type_rng.shuffle(perm)
        type_of = {n: ENTITY_TYPES[k % len(ENTITY_TYPES)] for k, n in enumerate(perm)}
        picks = [rng.randrange(len(names)) for _ in range(size)]
        order = [(n, type_of[n]) for n in picks]
    tweets = []
    for i, (n, etype) in enumerate(order):
        tokens, tags = _sentence(rng, names[n], etype)
        imgid = f"synth-{variant}-{split}-{i:05d}"
        tweets.append(Tweet(imgid, tokens, tags, source=f"synth-{variant}:{split}:{i}", image_label=etype))
    return tweets


def synth_loader(variant: str) -> Callable:
    """``loader(split, cfg)`` of ``synth-<variant>`` for its :class:`~mner_bench.registry.DatasetSpec`."""

    def load(split: str, cfg=None) -> list[Tweet]:
        return generate(variant, split, _cfg_of(cfg))

    return load


# --------------------------------------------------------------------------- images

#: the colour of each type's shape (before jitter) and its shape
TYPE_STYLE = {
    "PER": ((215, 35, 35), "disc"),
    "LOC": ((30, 165, 55), "triangle"),
    "ORG": ((35, 75, 220), "square"),
    "MISC": ((235, 195, 20), "diamond"),
}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
    if shape == "square":
        return [(cx - 0.8 * r, cy - 0.8 * r), (cx + 0.8 * r, cy - 0.8 * r), (cx + 0.8 * r, cy + 0.8 * r), (cx - 0.8 * r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(shape)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> None:
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=colour)


def _seed_of(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def render_image(label: str | None, key: str, size: int = 64) -> Image.Image:
    """The image of a tweet whose entity type is ``label`` (None or ``O``: no type shape, only
    the background and a grey distractor). ``key`` seeds the jitter: same key, same image."""
    if size < 16:
        raise ConfigError(f"data.synth.image_size must be at least 16 pixels, got {size}")
    if label not in TYPE_STYLE and label not in (None, "O"):
        raise ValueError(f"no image style for entity type {label!r}")
    rng = np.random.default_rng(_seed_of(key))
    grey = rng.uniform(150, 225)
    tint = rng.uniform(-12, 12, size=3)
    bg = np.clip(grey + tint + rng.normal(0, 10, size=(size, size, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(im)
    if label in (None, "O") or rng.random() < 0.5:  # distractor: a small grey shape
        shape = ("disc", "triangle", "square", "diamond")[rng.integers(4)]
        g = int(rng.uniform(60, 120))
        r = size * rng.uniform(0.08, 0.14)
        _draw(draw, shape, rng.uniform(r, size - r), rng.uniform(r, size - r), r, (g, g, g))
    if label in TYPE_STYLE:
        base, shape = TYPE_STYLE[label]
        colour = tuple(int(np.clip(c + rng.uniform(-30, 30), 0, 255)) for c in base)
        r = size * rng.uniform(0.22, 0.34)
        cx = size / 2 + size * rng.uniform(-0.12, 0.12)
        cy = size / 2 + size * rng.uniform(-0.12, 0.12)
        _draw(draw, shape, cx, cy, r, colour)
    arr = np.asarray(im, dtype=np.int16)
    arr = np.clip(arr + rng.normal(0, 6, size=arr.shape), 0, 255).astype(np.uint8)  # noise over the shapes too
    return Image.fromarray(arr, "RGB")


def entity_words(tweet: Tweet) -> tuple[str, ...]:
    """The words of a synth tweet's name (the tokens tagged as an entity)."""
    return tuple(tok for tok, tag in zip(tweet.tokens, tweet.tags, strict=True) if tag != "O")


def image_key(variant: str, seed: int, tweet: Tweet) -> str:
    """The key that seeds the jitter of ``tweet``'s image (:func:`render_image`).

    ``synth-ambiguous``: the tweet (its IMGID): the image shows the type and nothing else that
    the text could predict. ``synth-consistent``: the name: each name has one picture (as a
    person has one face), the same in every tweet that mentions it, so the text tells not only
    the type but the exact image; the alignment analysis can then ask whether the visual
    features generated from a tweet single out its own image (identical images count as one).
    """
    if variant == "consistent":
        return f"img|{variant}|{seed}|name|{' '.join(entity_words(tweet))}"
    return f"img|{variant}|{seed}|{tweet.imgid}"


def synth_image_loader(variant: str) -> Callable:
    """``image_loader(cfg) -> (IMGID -> PIL image | None)`` of ``synth-<variant>``."""

    def make(cfg=None) -> Callable[[str], Image.Image | None]:
        scfg = _cfg_of(cfg)
        # the key that seeds each image's jitter: per tweet (ambiguous), per name (consistent)
        keys = {t.imgid: (t.image_label, image_key(variant, scfg.seed, t)) for s in SPLITS for t in generate(variant, s, scfg)}

        def load(imgid: str) -> Image.Image | None:
            if imgid not in keys:
                return None
            label, key = keys[imgid]
            return render_image(label, key, scfg.image_size)

        return load

    return make


def first_entity_type(tags: Iterable[str]) -> str | None:
    """The type of the first entity in BIO ``tags`` (None when there is none)."""
    for tag in tags:
        if tag != "O":
            return tag.split("-", 1)[1]
    return None


def write_images(tweets: Iterable[Tweet], out: str | os.PathLike, size: int = 64,
                 loader: Callable[[str], Image.Image | None] | None = None, quality: int = 90) -> int:
    """Write ``<out>/<IMGID>.jpg`` for each tweet: the data set's own image (``loader``) when it
    has one, else an image rendered from the tweet's first entity type (:func:`render_image`,
    keyed by IMGID). Returns the number of files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for tw in tweets:
        im = loader(tw.imgid) if loader is not None else None
        if im is None:
            im = render_image(tw.image_label or first_entity_type(tw.tags), f"file|{tw.imgid}", size)
        elif im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        im.convert("RGB").save(out / f"{tw.imgid}.jpg", quality=quality)
        n += 1
    return n
