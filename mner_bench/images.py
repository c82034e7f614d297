"""Images for multimodal methods: find, decode, preprocess, cache and batch each tweet's image.

Where images come from (first that applies):

1. ``data.image_dir`` (``--image-dir``): a folder of ``<IMGID>.jpg`` (``.jpeg``, ``.png``,
   ``.webp``, ``.gif``, ``.bmp``, ``.tif``, ``.tiff`` too, any case; ``.jpg`` wins when several
   exist). A folder that does not exist is a :class:`~mner_bench.errors.ConfigError`.
2. the data set's own in-memory images (:attr:`~mner_bench.registry.DatasetSpec.image_loader`,
   e.g. the generated ``synth-*`` sets);
3. ``$MNER_BENCH_IMAGES``, a folder as in 1 (ignored for data sets that bring their own images);
4. nothing: the method still runs, every tweet counts as having no image, and a warning says
   so once.

A missing, unreadable, truncated, zero-byte, non-image, too large or tiny (shorter side below
``data.image_min_side``) image never stops a run and is never replaced by another: its row of
the batch is all zeros and its ``image_mask`` entry False. Each tweet of each split is counted
once (not once per epoch) in ``images_found``, ``images_missing``, ``images_corrupt`` (and
``images_withheld`` for ``data.withhold_images``), in ``run.extras["final_metrics"]``, which the
trainer logs with the final metrics.

Decoding: greyscale, palette, CMYK, 16-bit and images with alpha (composited on white) become
RGB; the EXIF orientation is applied; GIFs give their first frame. Memory stays bounded on huge
images: JPEGs are decoded at a reduced scale (PIL ``draft``, 1/2 to 1/8 in the DCT domain, never
below the target size) and any image still above :data:`MAX_DECODE_PIXELS` after that is
refused as unusable (counted corrupt) instead of being decoded. Preprocessing is deterministic,
the same at training and evaluation time and the same as open_clip's evaluation transform:
shorter side resized to the encoder's ``image_size`` S (bicubic, antialiased), centre crop S x S,
then ``(x / 255 - mean) / std`` with the encoder's constants. No random augmentation.

Cache: the decoded S x S uint8 images of every tweet of the run's data sets (all splits, so
every ``--shots`` draw reuses it) are written once per (image folder, S) as a ``.npy`` array
``[N, S, S, 3]`` read back by memory map, plus ``index.json`` (IMGID -> row, status). It lives
in ``data.image_cache_dir``, else ``$MNER_BENCH_CACHE/images``, else the user cache
(``~/.cache/mner-bench/images`` on Linux). Its key hashes the folder's absolute path, S, the
preprocessing settings and every image file's name, byte size and mtime, so a cache built from
other files or settings is never read; a changed file makes a new cache (the 3 most recent per
folder and size are kept). In-memory images (``synth-*``) are not cached on disk (rendering them
is cheaper); they are kept in memory for the run. ``data.image_cache=false`` turns the disk
cache off (images are then decoded at every use).

Timing: the seconds spent in the provider (reading, decoding or cache look-ups, normalising)
are logged per epoch as ``image_load_seconds_epoch`` (train + dev batches of that epoch, MLflow
step = epoch), and as final metrics ``image_load_seconds_epoch1``,
``image_load_seconds_epoch_mean``, ``image_load_seconds_total`` (the whole run),
``image_cache_build_seconds`` (0 when the cache was reused) and ``image_cache_hit``.

Object crops (HVPNeT/IFAformer style, optional): up to ``data.max_crops`` (3) crop images per
tweet from ``data.crop_dir`` (``--crop-dir``), listed by ``data.crop_index`` (a JSON object, or
the torch-saved dict HVPNeT ships, mapping an IMGID, with or without its image extension, to
file names relative to the crop folder) or, without an index, found by name:
``<IMGID>_crop<k>.<ext>`` (k = 0, 1, ...; lowest k first). They are preprocessed like images and
batched as ``Batch.crops [B, K, 3, S, S]`` with ``Batch.crop_mask [B, K]`` (False for a tweet's
missing crop slots); the aligner decides what to do with them (UMT appends their visual tokens
to the image's). Counted once per tweet: ``crops_found``, ``crops_missing`` (listed in the
index, no file), ``crops_corrupt``; a withheld image withholds its crops. Crops are decoded
at every use (not cached on disk).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .data import Tweet
from .errors import ConfigError

log = logging.getLogger(__name__)

#: accepted file extensions, most preferred first
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
#: largest image (pixels, after JPEG draft scaling) that is decoded; PIL's own bomb limit
MAX_DECODE_PIXELS = 89_478_485
#: bump when decoding or preprocessing changes: old caches are then never read
CACHE_VERSION = 1
#: caches kept per (image folder, size); older ones are removed
CACHE_KEEP = 3
#: corrupt images reported one by one at WARNING level (the rest at DEBUG)
WARN_FIRST = 5

FOUND, MISSING, CORRUPT, WITHHELD = "found", "missing", "corrupt", "withheld"
SPLITS = ("train", "dev", "test")

_PIL_LOCK = threading.Lock()


class ImageUnusable(Exception):
    """An image file exists but cannot be used; the message says why."""


# --------------------------------------------------------------------------- decoding


def _open_unbounded(path: str | os.PathLike | Any) -> Image.Image:
    """``Image.open`` without PIL's decompression-bomb check (done by :func:`load_image` after
    draft scaling, so that a huge JPEG can still be read at a reduced scale)."""
    with _PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        scale = 257.0 if im.mode.startswith("I;16") else max(1.0, float(arr.max()) / 255.0)
        arr = np.clip(arr / scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return im.convert("RGB")


def preprocess(im: Image.Image, size: int, min_side: int = 1, original_size: tuple[int, int] | None = None) -> np.ndarray:
    """A decoded image -> ``[size, size, 3]`` uint8: RGB, shorter side resized to ``size``
    (bicubic, antialiased), centre crop. Deterministic.

    :raises ImageUnusable: when the (original) shorter side is below ``min_side``.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    w, h = original_size or im.size
    if min(w, h) < min_side:
        raise ImageUnusable(f"too small ({w}x{h} pixels; data.image_min_side={min_side})")
    im = to_rgb(im)
    im = TF.resize(im, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    im = TF.center_crop(im, [size, size])
    arr = np.array(im, dtype=np.uint8)  # a writable copy
    if arr.shape != (size, size, 3):  # pragma: no cover - guaranteed by resize + crop
        raise ImageUnusable(f"unexpected shape {arr.shape} after preprocessing")
    return arr


def load_image(path: str | os.PathLike, size: int, min_side: int = 1) -> np.ndarray:
    """Read an image file and preprocess it (see :func:`preprocess`) with bounded memory.

    :raises ImageUnusable: for anything that makes the file unusable (empty, not an image,
        truncated, too large, too small, an unsupported mode), with the reason.
    """
    try:
        if os.path.getsize(path) == 0:
            raise ImageUnusable("empty file (0 bytes)")
        im = _open_unbounded(path)
    except ImageUnusable:
        raise
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageUnusable(f"not a readable image ({type(exc).__name__}: {exc})") from None
    try:
        original = im.size
        try:
            im.draft("RGB", (size, size))  # JPEG: decode at 1/2..1/8 scale, still >= size
        except Exception:  # draft is an optimisation only
            pass
        w, h = im.size
        if w * h > MAX_DECODE_PIXELS:
            raise ImageUnusable(
                f"too large to decode with bounded memory ({original[0]}x{original[1]} pixels, "
                f"{w}x{h} at the smallest decoding scale; limit {MAX_DECODE_PIXELS} pixels)"
            )
        try:
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block does not make the pixels unusable
                pass
            return preprocess(im, size, min_side, original)
        except ImageUnusable:
            raise
        except Exception as exc:  # truncated data, decoder errors, unsupported modes
            raise ImageUnusable(f"cannot decode ({type(exc).__name__}: {exc})") from None
    finally:
        im.close()


def normalise(images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[B, S, S, 3]`` uint8 -> ``[B, 3, S, S]`` float32 ``(x / 255 - mean) / std``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).contiguous().float()
    return torch.addcmul(-m / s, x, 1.0 / (255.0 * s))  # one pass: x * scale + bias


# --------------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class ImageFile:
    name: str
    bytes: int
    mtime_ns: int


class ImageDirectory:
    """A folder of ``<IMGID>.<ext>`` images, listed once."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self._names: dict[str, str] = {}
        rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
        best: dict[str, int] = {}
        with os.scandir(self.root) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                r = rank.get(ext.lower())
                if r is None or not entry.is_file():
                    continue
                if stem not in best or r < best[stem]:
                    best[stem] = r
                    self._names[stem] = entry.name

    def __len__(self) -> int:
        return len(self._names)

    def locate(self, imgid: str) -> ImageFile | None:
        """The image file of ``imgid`` with its size and mtime, or None when there is none."""
        name = self._names.get(imgid)
        if name is None:
            return None
        try:
            st = os.stat(self.root / name)
        except OSError:
            return None
        return ImageFile(name, st.st_size, st.st_mtime_ns)

    def path(self, f: ImageFile) -> Path:
        return self.root / f.name


# --------------------------------------------------------------------------- disk cache


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """``explicit`` (``data.image_cache_dir``), else ``$MNER_BENCH_CACHE/images``, else the user cache."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("MNER_BENCH_CACHE")
    if env:
        return Path(env).expanduser() / "images"
    import platformdirs

    return Path(platformdirs.user_cache_dir("mner-bench")) / "images"


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ImageCache:
    """Preprocessed images of one image folder at one size: ``images.npy`` ``[N, S, S, 3]``
    uint8 (memory-mapped) and ``index.json`` (IMGID -> row, status, reason)."""

    def __init__(self, path: Path, built_seconds: float = 0.0, hit: bool = True):
        self.path = path
        meta = json.loads((path / "index.json").read_text())
        self.entries: dict[str, list] = meta["entries"]
        self.size = int(meta["image_size"])
        arr_path = path / "images.npy"
        self.array = np.load(arr_path, mmap_mode="r") if meta["rows"] else np.load(arr_path)
        self.built_seconds = built_seconds
        self.hit = hit

    def __contains__(self, imgid: str) -> bool:
        return imgid in self.entries

    def get(self, imgid: str) -> tuple[str, np.ndarray | None, str]:
        row, status, reason = self.entries[imgid]
        return status, (None if row is None else self.array[row]), reason

    @staticmethod
    def key(directory: ImageDirectory, files: dict[str, ImageFile | None], size: int, min_side: int) -> tuple[str, str]:
        """(folder key, content key): the first from the folder's absolute path and the
        preprocessing settings, the second from every file's name, size and mtime as well."""
        settings = {"version": CACHE_VERSION, "dir": str(directory.root), "size": size, "min_side": min_side,
                    "max_pixels": MAX_DECODE_PIXELS, "resize": "shorter-side-bicubic-antialias+centre-crop"}
        listing = sorted([i, None, 0, 0] if f is None else [i, f.name, f.bytes, f.mtime_ns] for i, f in files.items())
        return _sha(settings)[:16], _sha({**settings, "files": listing})[:32]

    @classmethod
    def open_or_build(cls, root: Path, directory: ImageDirectory, imgids: Iterable[str], size: int,
                      min_side: int) -> ImageCache:
        """The cache of these images, read when it exists, else built (decoding every file once)."""
        files = {i: directory.locate(i) for i in sorted(set(imgids))}
        folder_key, key = cls.key(directory, files, size, min_side)
        parent = root / folder_key
        final = parent / key
        if (final / "index.json").is_file():
            try:
                cache = cls(final)
                log.info("image cache: reusing %s (%d images of %s at %dx%d)", final, len(cache.entries),
                         directory.root, size, size)
                return cache
            except (OSError, ValueError, KeyError) as exc:  # damaged: build it again
                log.warning("image cache %s is damaged (%s); building it again", final, exc)
                shutil.rmtree(final, ignore_errors=True)
        t0 = time.perf_counter()
        n_files = sum(f is not None for f in files.values())
        log.info("image cache: decoding %d images of %s at %dx%d into %s (once; later runs reuse it)",
                 n_files, directory.root, size, size, final)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        except OSError as exc:
            raise ConfigError(f"image cache folder {parent} cannot be created ({exc.strerror or exc}); "
                              f"set data.image_cache_dir or MNER_BENCH_CACHE, or data.image_cache=false") from None
        try:
            shape = (n_files, size, size, 3)
            if n_files:
                arr = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
            else:
                np.save(tmp / "images.npy", np.zeros(shape, dtype=np.uint8))
            entries: dict[str, list] = {}
            row = 0
            for imgid, f in files.items():
                if f is None:
                    entries[imgid] = [None, MISSING, "no file"]
                    continue
                try:
                    arr[row] = load_image(directory.path(f), size, min_side)
                    entries[imgid] = [row, FOUND, ""]
                except ImageUnusable as exc:
                    entries[imgid] = [None, CORRUPT, f"{f.name}: {exc}"]
                row += 1
            if n_files:
                arr.flush()
                del arr
            meta = {"version": CACHE_VERSION, "image_dir": str(directory.root), "image_size": size,
                    "min_side": min_side, "key": key, "rows": n_files, "entries": entries}
            (tmp / "index.json").write_text(json.dumps(meta))
            try:
                os.rename(tmp, final)
            except OSError:  # built meanwhile by another process: use that one
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _prune(parent, keep=CACHE_KEEP)
        seconds = time.perf_counter() - t0
        log.info("image cache: built in %.1f s", seconds)
        return cls(final, built_seconds=seconds, hit=False)


def _prune(parent: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently built caches in ``parent``."""
    caches = [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    caches.sort(key=lambda p: (p / "index.json").stat().st_mtime if (p / "index.json").exists() else 0, reverse=True)
    for old in caches[keep:]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the provider


class ImageProvider:
    """``provider(tweets) -> (images [B, 3, S, S] float32, image_mask [B] bool)``.

    ``images`` are normalised with the encoder's ``mean``/``std``; rows of tweets without a
    usable image are zeros and their mask is False. Exactly one of ``directory`` (optionally
    with a ``cache``) and ``loader`` (IMGID -> PIL image or None) is the source; with neither,
    every tweet has no image.

    :param metrics: dict that receives the counts and timings (the run's ``final_metrics``).
    :param withheld: IMGIDs whose images are withheld on purpose (``data.withhold_images``).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                 directory: ImageDirectory | None = None, cache: ImageCache | None = None,
                 loader: Callable[[str], Image.Image | None] | None = None, min_side: int = 16,
                 withheld: Iterable[str] = (), metrics: dict[str, float] | None = None,
                 crops: CropSource | None = None):
        if directory is not None and loader is not None:
            raise ValueError("an image provider reads from a directory or from a loader, not both")
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.directory, self.cache, self.loader = directory, cache, loader
        self.min_side = min_side
        self.withheld = frozenset(withheld)
        self.metrics = metrics if metrics is not None else {}
        self._memo: dict[str, tuple[str, np.ndarray | None]] = {}
        self._counted: dict[int, Tweet] = {}  # id -> tweet (kept alive so that ids stay unique)
        self._warned = 0
        self.epoch_seconds: list[float] = []
        self._epoch_start: float | None = None
        self.total_seconds = 0.0
        for k in (f"images_{FOUND}", f"images_{MISSING}", f"images_{CORRUPT}", f"images_{WITHHELD}"):
            self.metrics.setdefault(k, 0)
        self.metrics.setdefault("image_load_seconds_total", 0.0)
        self.crop_source = crops
        self._crops_counted: set[int] = set()
        if crops is not None:
            for k in ("crops_found", "crops_missing", "crops_corrupt"):
                self.metrics.setdefault(k, 0)
        if cache is not None:
            self.metrics["image_cache_hit"] = float(cache.hit)
            self.metrics["image_cache_build_seconds"] = cache.built_seconds

    # -- one image ------------------------------------------------------------------------
    def lookup(self, imgid: str) -> tuple[str, np.ndarray | None]:
        """(status, ``[S, S, 3]`` uint8 image or None) of one IMGID."""
        if imgid in self.withheld:
            return WITHHELD, None
        hit = self._memo.get(imgid)
        if hit is not None:
            return hit
        reason = ""
        if self.cache is not None and imgid in self.cache:
            status, arr, reason = self.cache.get(imgid)
            if arr is not None:
                return status, arr  # a row of the memory map (not kept in memory by us)
        else:
            status, arr = MISSING, None
            if self.directory is not None:
                f = self.directory.locate(imgid)
                if f is not None:
                    try:
                        status, arr = FOUND, load_image(self.directory.path(f), self.image_size, self.min_side)
                    except ImageUnusable as exc:
                        status, reason = CORRUPT, f"{f.name}: {exc}"
            elif self.loader is not None:
                try:
                    im = self.loader(imgid)
                    if im is not None:
                        status, arr = FOUND, preprocess(im, self.image_size, self.min_side)
                except Exception as exc:
                    status, reason = CORRUPT, f"IMGID {imgid}: {type(exc).__name__}: {exc}"
        # remembered: every status, and in-memory images; files without a disk cache are
        # decoded again at each use (their status is still remembered when unusable)
        if arr is None or self.loader is not None:
            self._memo[imgid] = (status, arr)
        if status == CORRUPT:
            self._warn_corrupt(imgid, reason)
        return status, arr

    def _warn_corrupt(self, imgid: str, reason: str) -> None:
        self._warned += 1
        level = logging.WARNING if self._warned <= WARN_FIRST else logging.DEBUG
        more = " (further ones are logged at DEBUG level)" if self._warned == WARN_FIRST else ""
        where = self.directory.root if self.directory is not None else "the data set's images"
        log.log(level, "unusable image for tweet %s in %s: %s; the tweet is treated as having no image%s",
                imgid, where, reason, more)

    # -- a batch --------------------------------------------------------------------------
    def __call__(self, tweets: Sequence[Tweet]) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        S = self.image_size
        rows, arrays = [], []
        for b, tw in enumerate(tweets):
            status, arr = self.lookup(tw.imgid)
            if id(tw) not in self._counted:
                self._counted[id(tw)] = tw
                self.metrics[f"images_{status}"] += 1
            if arr is not None:
                rows.append(b)
                arrays.append(arr)
        mask = torch.zeros(len(tweets), dtype=torch.bool)
        mask[rows] = True
        if arrays and len(arrays) == len(tweets):
            images = normalise(np.stack(arrays), self.mean, self.std)
        else:
            images = torch.zeros((len(tweets), 3, S, S), dtype=torch.float32)
            if arrays:
                images[rows] = normalise(np.stack(arrays), self.mean, self.std)
        dt = time.perf_counter() - t0
        self.total_seconds += dt
        self.metrics["image_load_seconds_total"] = self.total_seconds
        return images, mask

    def crops(self, tweets: Sequence[Tweet]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(crops [B, K, 3, S, S], crop_mask [B, K])`` with K = ``max_crops``, or None without a
        crop source. A crop that is missing or unusable leaves its slot zero and masked."""
        if self.crop_source is None:
            return None
        t0 = time.perf_counter()
        S, K = self.image_size, self.crop_source.max_crops
        out = torch.zeros((len(tweets), K, 3, S, S), dtype=torch.float32)
        mask = torch.zeros((len(tweets), K), dtype=torch.bool)
        for b, tw in enumerate(tweets):
            first = id(tw) not in self._crops_counted
            if first:
                self._crops_counted.add(id(tw))
            if tw.imgid in self.withheld:
                continue
            for k, path in enumerate(self.crop_source.files(tw.imgid)):
                status = "found"
                if not path.is_file():
                    status = "missing"
                    if first:
                        log.warning("crop %s of tweet %s is listed but does not exist; the slot stays empty", path, tw.imgid)
                else:
                    try:
                        arr = load_image(path, S, self.min_side)
                        out[b, k] = normalise(arr[None], self.mean, self.std)[0]
                        mask[b, k] = True
                    except ImageUnusable as exc:
                        status = "corrupt"
                        if first:
                            log.warning("unusable crop %s of tweet %s: %s; the slot stays empty", path, tw.imgid, exc)
                if first:
                    self.metrics[f"crops_{status}"] += 1
        self.total_seconds += time.perf_counter() - t0
        self.metrics["image_load_seconds_total"] = self.total_seconds
        return out, mask

    # -- per-epoch timing (called by the core plugin's epoch hooks) -------------------------
    def start_epoch(self) -> None:
        self._epoch_start = self.total_seconds

    def end_epoch(self) -> float:
        """Seconds spent loading images since :meth:`start_epoch`; recorded in the metrics."""
        secs = self.total_seconds - (self._epoch_start or 0.0)
        self.epoch_seconds.append(secs)
        self.metrics["image_load_seconds_epoch1"] = self.epoch_seconds[0]
        self.metrics["image_load_seconds_epoch_mean"] = float(np.mean(self.epoch_seconds))
        return secs


# --------------------------------------------------------------------------- object crops

_CROP_NAME = re.compile(r"^(?P<imgid>.+)_crop(?P<k>\d+)\.(?P<ext>[A-Za-z]+)$")


class CropSource:
    """Where each tweet's object crops are: ``files(imgid) -> [Path, ...]`` (at most ``max_crops``).

    :param root: the crop folder.
    :param index: IMGID -> file names relative to ``root`` (keys may carry an image extension,
        as in HVPNeT's dicts), or None to find crops by name (``<IMGID>_crop<k>.<ext>``).
    """

    def __init__(self, root: str | os.PathLike, index: dict[str, list[str]] | None = None, max_crops: int = 3):
        self.root = Path(root)
        self.max_crops = int(max_crops)
        self.by_id: dict[str, list[str]] = {}
        if index is not None:
            for key, names in index.items():
                self.by_id[_strip_image_ext(str(key))] = [str(n) for n in names]
        else:
            found: dict[str, list[tuple[int, str]]] = {}
            with os.scandir(self.root) as entries:
                for e in entries:
                    m = _CROP_NAME.match(e.name)
                    if m and "." + m["ext"].lower() in IMAGE_EXTENSIONS and e.is_file():
                        found.setdefault(m["imgid"], []).append((int(m["k"]), e.name))
            self.by_id = {k: [name for _, name in sorted(v)] for k, v in found.items()}

    def files(self, imgid: str) -> list[Path]:
        return [self.root / name for name in self.by_id.get(imgid, [])[: self.max_crops]]

    @classmethod
    def from_config(cls, crop_dir: str, crop_index: str | None, max_crops: int) -> CropSource:
        root = Path(crop_dir).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.crop_dir (--crop-dir): the crop folder {root} "
                              f"{'is not a folder' if root.exists() else 'does not exist'}")
        if max_crops < 1:
            raise ConfigError(f"data.max_crops must be at least 1, got {max_crops}")
        index = None
        if crop_index:
            index = load_crop_index(crop_index)
        return cls(root, index, max_crops)


def crop_source(data) -> CropSource | None:
    """The crop source of a run's ``data`` config (``crop_dir``, ``crop_index``, ``max_crops``),
    or None without ``crop_dir``."""
    if not data.get("crop_dir"):
        return None
    return CropSource.from_config(data.crop_dir, data.get("crop_index"), data.get("max_crops", 3))


def _strip_image_ext(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in IMAGE_EXTENSIONS else name


def load_crop_index(path: str | os.PathLike) -> dict[str, list[str]]:
    """A crop index: JSON (``{"IMGID": ["file", ...]}``) or a torch-saved dict of the same shape."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"data.crop_index: {p} does not exist")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
        else:
            data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader error is the file's fault: name it
        raise ConfigError(f"data.crop_index: {p} cannot be read as JSON or a torch-saved dict "
                          f"({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"data.crop_index: {p} must map IMGIDs to lists of crop file names, got {type(data).__name__}")
    for key, names in data.items():
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"data.crop_index: {p}: the entry for '{key}' must be a list of file names, got {names!r}")
    return data


# --------------------------------------------------------------------------- from a run config


def _warn_no_images(method: str) -> None:
    log.warning(
        "NO IMAGES: method '%s' uses images, but no image folder is set (data.image_dir / "
        "--image-dir / $MNER_BENCH_IMAGES) and the data set has none of its own. It runs with "
        "every tweet marked as having no image (images_missing counts them).", method,
    )


def _image_folder(value: str, where: str) -> ImageDirectory:
    path = Path(value).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise ConfigError(f"{where}: the image folder {path} {what}. Point it at a folder of <IMGID>.jpg "
                          f"images, or leave it unset to run without images.")
    try:
        return ImageDirectory(path)
    except OSError as exc:
        raise ConfigError(f"{where}: the image folder {path} cannot be listed ({exc.strerror or exc})") from None


def make_image_provider(cfg, model, ctx) -> ImageProvider:
    """The image provider of a run (called by :func:`mner_bench.training.run` when the aligner
    uses images). Also sets the run tags ``images`` (``folder``, ``dataset`` or ``none``),
    ``image_dir`` and, for a random-weight encoder, ``visual_weights=random``; registers
    itself in ``ctx.extras["image_provider"]`` for the per-epoch timing hooks."""
    enc = model.visual_encoder
    if enc is None:
        raise ConfigError(f"method '{cfg.method}': aligner '{cfg.aligner.type}' uses images, but the "
                          f"config has no visual_encoder to take the image size and normalisation from")
    if getattr(enc, "random_init", False):
        ctx.tags["visual_weights"] = "random"
    data = cfg.data
    bad = [s for s in data.withhold_images if s not in SPLITS]
    if bad:
        raise ConfigError(f"data.withhold_images: unknown split(s) {bad}; splits are {', '.join(SPLITS)}")
    if data.image_min_side < 1:
        raise ConfigError(f"data.image_min_side must be at least 1, got {data.image_min_side}")

    registry = ctx.registry
    main = registry.spec("dataset", data.dataset)
    other = registry.spec("dataset", data.eval_dataset) if data.eval_dataset else None
    # the tweets of every split the run may use (for the cache and for withheld images)
    splits: dict[str, list[Tweet]] = {s: main.loader(s, data) for s in main.splits if s in SPLITS}
    if other is not None:
        splits["test"] = other.loader("test", data)
    withheld = {t.imgid for s in data.withhold_images for t in splits.get(s, [])}
    metrics = ctx.extras.setdefault("final_metrics", {})
    size, mean, std = int(enc.image_size), enc.mean, enc.std
    common = {"min_side": data.image_min_side, "withheld": withheld, "metrics": metrics}
    common["crops"] = crop_source(data)
    if common["crops"] is not None:
        ctx.tags["crop_dir"] = str(common["crops"].root)
    elif data.get("crop_index"):
        raise ConfigError("data.crop_index is set without data.crop_dir (--crop-dir): the crops' folder is needed")

    loaders = [spec.image_loader(data) for spec in (main, other) if spec is not None and spec.image_loader]
    directory = None
    if data.image_dir:
        directory = _image_folder(data.image_dir, "data.image_dir (--image-dir)")
    elif not loaders and os.environ.get("MNER_BENCH_IMAGES"):
        directory = _image_folder(os.environ["MNER_BENCH_IMAGES"], "$MNER_BENCH_IMAGES")

    if directory is not None:
        ctx.tags.update({"images": "folder", "image_dir": str(directory.root)})
        cache = None
        if data.image_cache:
            ids = {t.imgid for tweets in splits.values() for t in tweets}
            cache = ImageCache.open_or_build(cache_root(data.image_cache_dir), directory, ids, size, data.image_min_side)
        provider = ImageProvider(size, mean, std, directory=directory, cache=cache, **common)
    elif loaders:
        ctx.tags["images"] = "dataset"

        def chained(imgid: str) -> Image.Image | None:
            for fn in loaders:
                im = fn(imgid)
                if im is not None:
                    return im
            return None

        provider = ImageProvider(size, mean, std, loader=chained, **common)
    else:
        ctx.tags["images"] = "none"
        _warn_no_images(cfg.method)
        provider = ImageProvider(size, mean, std, **common)
    ctx.extras["image_provider"] = provider
    return provider


def make_prediction_image_provider(cfg, model) -> ImageProvider:
    """The image provider for tagging new tweets (``mner-bench predict``) with a trained model.

    Images come from ``data.image_dir``, else ``$MNER_BENCH_IMAGES``, else the trained data set's
    own images (matched by IMGID; ``synth-*``), else none (a warning says so once). There is no
    disk cache here (the tweets are not a known data set): images are decoded at each use.
    Counts are in ``provider.metrics``. ``cfg`` may be a saved ``config.yaml`` of an older run:
    missing image settings take their defaults.
    """
    enc = model.visual_encoder
    if enc is None:
        raise ConfigError("this model uses images but has no visual_encoder")
    data = cfg.data
    min_side = int(data.get("image_min_side", 16) or 16)
    size, mean, std = int(enc.image_size), enc.mean, enc.std
    image_dir = data.get("image_dir")
    if image_dir:
        return ImageProvider(size, mean, std, directory=_image_folder(image_dir, "--image-dir (data.image_dir)"),
                             min_side=min_side, crops=crop_source(data))
    if os.environ.get("MNER_BENCH_IMAGES"):
        return ImageProvider(size, mean, std, directory=_image_folder(os.environ["MNER_BENCH_IMAGES"], "$MNER_BENCH_IMAGES"),
                             min_side=min_side)
    from .errors import MnerBenchError
    from .registry import get_registry

    try:
        spec = get_registry().spec("dataset", data.get("dataset"))
    except MnerBenchError:
        spec = None
    if spec is not None and spec.image_loader is not None:
        return ImageProvider(size, mean, std, loader=spec.image_loader(data), min_side=min_side)
    _warn_no_images(str(cfg.get("method", "?")))
    return ImageProvider(size, mean, std, min_side=min_side)


# --------------------------------------------------------------------------- evaluation protocols


class FixedImageProvider:
    """Replaces every tweet's image for an evaluation protocol (paper Table 7).

    ``mode="empty"``: a uniform grey image (RGB 128, 128, 128), marked valid — the "uniform
    empty image" protocol. ``mode="none"``: no image at all (zeros, mask False), as when a
    tweet's image is missing.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], mode: str):
        if mode not in ("empty", "none"):
            raise ValueError(f"mode must be 'empty' or 'none', got {mode!r}")
        self.mode = mode
        S = int(image_size)
        grey = np.full((1, S, S, 3), 128, dtype=np.uint8)
        self._empty = normalise(grey, mean, std)[0]
        self._size = S

    def __call__(self, tweets: Sequence[Tweet]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(tweets)
        if self.mode == "none":
            return torch.zeros((n, 3, self._size, self._size)), torch.zeros(n, dtype=torch.bool)
        return self._empty.expand(n, -1, -1, -1).clone(), torch.ones(n, dtype=torch.bool)
