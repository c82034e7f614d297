"""Text baselines of mner-bench: BERT-CRF (``bertcrf``) and BERT with a softmax (``bert``)."""
