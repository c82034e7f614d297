"""The tag set shared by every data set: BIO over PER, LOC, ORG, MISC, with ``O`` at index 0."""

from __future__ import annotations

from .data import ENTITY_TYPES

TAGS: tuple[str, ...] = ("O", *(f"{p}-{t}" for t in ENTITY_TYPES for p in ("B", "I")))
TAG_TO_ID: dict[str, int] = {t: i for i, t in enumerate(TAGS)}


def encode_tags(tags: list[str]) -> list[int]:
    return [TAG_TO_ID[t] for t in tags]


def decode_tags(ids: list[int]) -> list[str]:
    return [TAGS[i] for i in ids]
