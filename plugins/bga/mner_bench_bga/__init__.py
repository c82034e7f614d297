"""BGA-MNER: Bidirectional Generative Alignment for multimodal NER (method ``bga``)."""
