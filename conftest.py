"""Set-up shared by every pytest run of this repository (``tests/``, ``plugins/*/tests``,
``benchmarks/``), loaded before any test module imports torch or transformers: never touch
the network, and read the real data from ``../shared/data`` when it is there and
``MNER_BENCH_DATA`` is not set."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
if "MNER_BENCH_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["MNER_BENCH_DATA"] = str(SHARED_DATA)
