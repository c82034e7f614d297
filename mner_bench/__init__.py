"""mner-bench: an open benchmark suite for multimodal named entity recognition."""

__version__ = "0.1.0"
