"""Twitter CoNLL data: reading, validating, data-set locations and few-shot sampling.

File format (Twitter2015/2017 as published with UMT): a tweet starts with ``IMGID:<id>``,
then one ``token<TAB>tag`` line per word, and a blank line ends it. Tags are BIO over
PER/LOC/ORG/MISC; Twitter2015's ``OTHER`` is read as ``MISC``. Windows line endings and a
UTF-8 byte-order mark are accepted. Anything else that is malformed is a
:class:`~mner_bench.errors.DataError` naming file and line: no token, tag or tweet is ever
dropped silently.
"""

from __future__ import annotations

import hashlib
import os
import random
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from .errors import DataError, MnerBenchError

ENTITY_TYPES: tuple[str, ...] = ("PER", "LOC", "ORG", "MISC")
TYPE_ALIASES = {"OTHER": "MISC"}


@dataclass
class Tweet:
    """One tweet: its image id, words and gold BIO tags (one per word)."""

    imgid: str
    tokens: list[str]
    tags: list[str]
    source: str = ""  # "file:line" of the IMGID line, for error messages
    image_label: str | None = field(default=None, repr=False)  # used by generated data sets

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.tags):
            raise DataError(
                f"tweet {self.imgid} has {len(self.tokens)} tokens but {len(self.tags)} tags",
                self.source or None,
            )


def normalise_tag(tag: str, path: object, line: int) -> str:
    """Check one BIO tag and map ``OTHER`` to ``MISC``; raise on anything else."""
    if tag == "O":
        return tag
    prefix, sep, etype = tag.partition("-")
    if sep and prefix in ("B", "I"):
        etype = TYPE_ALIASES.get(etype, etype)
        if etype in ENTITY_TYPES:
            return f"{prefix}-{etype}"
    hint = ""
    if tag.upper() != tag and _is_valid_tag(tag.upper()):
        hint = f" Tags are case-sensitive: did you mean '{tag.upper()}'?"
    elif sep and prefix in ("E", "S"):
        hint = " IOBES tags are not accepted: convert the file to BIO (E- -> I-, S- -> B-)."
    raise DataError(
        f"unknown tag '{tag}'; expected O or B-/I- followed by one of "
        f"{', '.join(ENTITY_TYPES)} (or OTHER).{hint}",
        path,
        line,
    )


def _is_valid_tag(tag: str) -> bool:
    try:
        normalise_tag(tag, None, 0)
    except DataError:
        return False
    return True


def parse_conll(text: str, path: object = "<string>") -> list[Tweet]:
    """Parse the text of a Twitter CoNLL file into tweets (see the module docstring)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    tweets: list[Tweet] = []
    imgid: str | None = None
    start = 0
    tokens: list[str] = []
    tags: list[str] = []

    def close(lineno: int) -> None:
        nonlocal imgid, tokens, tags
        if imgid is None:
            return
        if not tokens:
            raise DataError(f"tweet IMGID:{imgid} has no tokens", path, start)
        tweets.append(Tweet(imgid, tokens, tags, source=f"{path}:{start}"))
        imgid, tokens, tags = None, [], []

    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for lineno, raw in enumerate(lines, start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if line.startswith("IMGID:"):
            close(lineno)
            imgid = line[len("IMGID:") :].strip()
            if not imgid:
                raise DataError("empty IMGID", path, lineno)
            start = lineno
            continue
        if not line.strip():
            close(lineno)
            continue
        if imgid is None:
            raise DataError(
                f"token line outside a tweet (expected an 'IMGID:' line first): {line[:40]!r}",
                path,
                lineno,
            )
        if "\t" not in line:
            raise DataError(
                f"expected 'token<TAB>tag', found no tab in {line[:60]!r}", path, lineno
            )
        token, tag = line.split("\t", 1)
        if "\t" in tag:
            raise DataError(f"expected 2 tab-separated fields, found more in {line[:60]!r}", path, lineno)
        if token == "":
            raise DataError("empty token before the tab", path, lineno)
        tokens.append(token)
        tags.append(normalise_tag(tag.strip(), path, lineno))
    close(len(lines) + 1)
    if not tweets:
        raise DataError("no tweets found (an empty file, or only blank lines)", path)
    return tweets


def read_conll(path: str | os.PathLike) -> list[Tweet]:
    """Read a Twitter CoNLL file; errors name the file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})", path, line
        ) from None
    return parse_conll(text, path)


def write_conll(tweets: Iterable[Tweet], path: str | os.PathLike, predicted: Sequence[Sequence[str]] | None = None) -> None:
    """Write tweets in the data's CoNLL form; with ``predicted``, a third column of predictions."""
    with open(path, "w", encoding="utf-8") as fh:
        for i, tw in enumerate(tweets):
            fh.write(f"IMGID:{tw.imgid}\n")
            for j, (tok, tag) in enumerate(zip(tw.tokens, tw.tags, strict=True)):
                if predicted is None:
                    fh.write(f"{tok}\t{tag}\n")
                else:
                    fh.write(f"{tok}\t{tag}\t{predicted[i][j]}\n")
            fh.write("\n")


def read_predictions(path: str | os.PathLike) -> tuple[list[list[str]], list[list[str]]]:
    """Read a ``predictions.txt`` (token, gold, predicted) back: (gold tags, predicted tags)."""
    gold: list[list[str]] = []
    pred: list[list[str]] = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("IMGID:"):
            gold.append([])
            pred.append([])
        elif line:
            parts = line.split("\t")
            if len(parts) != 3:
                raise DataError("expected token<TAB>gold<TAB>predicted", path, lineno)
            gold[-1].append(parts[1])
            pred[-1].append(parts[2])
    return gold, pred


# --------------------------------------------------------------------------- data sets on disk

PUBLIC_SOURCE = "https://raw.githubusercontent.com/jefferyYu/UMT/master/data"
SPLIT_FILES = {"train": "train.txt", "dev": "valid.txt", "test": "test.txt"}

#: sha256 of each published file (see shared/data/README.md of the project).
CHECKSUMS = {
    "twitter2015/train.txt": "a6246e37aa1c8acd738747fa8257e01775f2a1cc0d4f36f82f9d41d6246ad6fa",
    "twitter2015/valid.txt": "9dcc7f9df7331de3c9cdf67a3450e041c41c6254b5e43925c576e2dfaaabe2ad",
    "twitter2015/test.txt": "edb2665b89bfe58bca06a2c10b9b31cbfa95456135b6a4cbf55c872e48d9b8f9",
    "twitter2017/train.txt": "801e149e8635b19d66b4ec1212c329be340ada501b35c5fa55455fb6f53633be",
    "twitter2017/valid.txt": "41b5db90cb32059c14c2c3ccd50845fb77f1e3d3e4f7d0c210a61bc507d8a73e",
    "twitter2017/test.txt": "a7d9e172ae85bd3e35276eb2b01ce223321bdc92a47b234e24305d72e7a05243",
}


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where data sets live: ``explicit`` (``--data-dir``), else ``$MNER_BENCH_DATA``, else the
    user cache directory."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("MNER_BENCH_DATA")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("mner-bench")) / "data"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_file(root: Path, rel: str, *, download: bool = True) -> Path:
    """Return ``root/rel``, downloading it from the public source when it is missing.

    A downloaded file is checked against its published sha256 before it is kept.
    """
    path = root / rel
    if path.exists():
        return path
    url = f"{PUBLIC_SOURCE}/{rel}"
    where = (
        f"Put the file at {path} (or point --data-dir / MNER_BENCH_DATA at a folder holding "
        f"{rel.split('/')[0]}/{{train,valid,test}}.txt); its public source is {url}"
    )
    if not download:
        raise DataError(f"data file missing. {where}", path)
    tmp = path.with_suffix(path.suffix + ".part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as out:
            out.write(resp.read())
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"data file missing and the download failed ({exc}). {where}", path) from None
    expected = CHECKSUMS.get(rel)
    got = sha256_of(tmp)
    if expected and got != expected:
        tmp.unlink(missing_ok=True)
        raise DataError(f"downloaded file has sha256 {got}, expected {expected}; not kept", path)
    tmp.replace(path)
    return path


def twitter_loader(folder: str):
    """A loader for one of the Twitter data sets (``twitter2015`` or ``twitter2017``)."""

    def load(split: str, cfg=None) -> list[Tweet]:
        if split not in SPLIT_FILES:
            raise MnerBenchError(f"unknown split '{split}'; splits: {', '.join(SPLIT_FILES)}")
        root = data_dir(getattr(cfg, "data_dir", None) if cfg is not None else None)
        rel = f"{folder}/{SPLIT_FILES[split]}"
        return read_conll(ensure_file(root, rel, download=getattr(cfg, "download", True)))

    return load


# --------------------------------------------------------------------------- few-shot subsets


def sample_shots(tweets: Sequence[Tweet], shots: int | None, seed: int) -> list[Tweet]:
    """``shots`` tweets drawn without replacement with ``seed`` (all tweets when None).

    Deterministic for given (data, shots, seed); the order of the result follows the draw.
    """
    if shots is None:
        return list(tweets)
    if shots <= 0:
        raise MnerBenchError(f"--shots must be a positive number of tweets, got {shots}")
    if shots > len(tweets):
        raise MnerBenchError(
            f"--shots {shots} is larger than the training set ({len(tweets)} tweets)"
        )
    rng = random.Random(seed)
    return rng.sample(list(tweets), shots)
