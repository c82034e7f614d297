"""The BGA-MNER plugin: registers its aligner and the ``bga`` method through the
``mner_bench`` entry point (work in progress: nothing is registered yet)."""

from __future__ import annotations
