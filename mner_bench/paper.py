"""Published figures of the BGA-MNER paper (Table 2), for ``mner-bench report --paper``.

Source: ``shared/paper/published-results.md`` of the project (the paper's Table 2; BERT-base
uncased, CLIP ViT-B/32, full training sets, 30 epochs). F1 values in percent.
"""

from __future__ import annotations

#: method -> data set -> {PER, LOC, ORG, MISC, P, R, F1}
TABLE2: dict[str, dict[str, dict[str, float]]] = {
    "BERT-CRF": {
        "twitter2015": {"PER": 84.74, "LOC": 80.51, "ORG": 60.27, "MISC": 37.29, "P": 69.22, "R": 74.59, "F1": 71.81},
        "twitter2017": {"PER": 90.25, "LOC": 83.05, "ORG": 81.13, "MISC": 62.21, "P": 83.32, "R": 83.57, "F1": 83.44},
    },
    "UMT": {
        "twitter2015": {"PER": 85.24, "LOC": 81.58, "ORG": 63.03, "MISC": 39.45, "P": 71.67, "R": 75.23, "F1": 73.41},
        "twitter2017": {"PER": 91.56, "LOC": 84.73, "ORG": 82.24, "MISC": 70.10, "P": 85.28, "R": 85.34, "F1": 85.31},
    },
    "BGA-MNER": {
        "twitter2015": {"PER": 86.80, "LOC": 83.62, "ORG": 63.60, "MISC": 42.65, "P": 78.60, "R": 74.16, "F1": 76.31},
        "twitter2017": {"PER": 93.71, "LOC": 85.55, "ORG": 85.71, "MISC": 71.05, "P": 87.71, "R": 87.71, "F1": 87.71},
    },
}

#: total parameters (Table 5), millions
PARAMS_M = {"UMT": 233.6, "BGA-MNER": 130.3}
