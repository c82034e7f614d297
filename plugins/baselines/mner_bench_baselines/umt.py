"""UMT: the Unified Multimodal Transformer of Yu et al. (ACL 2020), "Improving Multimodal Named
Entity Recognition via Entity Span Detection with Unified Multimodal Transformer".

Reimplemented from the paper's description (no code was copied). Reading order, top to bottom:

1. :class:`UmtCrossAttention` — the paper's cross-modal transformer layer: a BERT layer whose
   self-attention is replaced by multi-head cross-attention (queries from one sequence, keys and
   values from another). With the same sequence on both sides it is a plain BERT layer, which
   is how the two extra text layers are built.
2. :class:`UmtSpanDetector` — the auxiliary entity span detection (ESD) head: untyped
   ``O``/``B``/``I`` scores, its own CRF loss, and the fixed conversion matrix that spreads them
   onto the typed tags.
3. :class:`UmtAligner` — the whole UMT on top of the text and visual encoders:

   * ``C``: the text encoder's last layer (with the text encoder's own dropout,
     ``text_encoder.dropout``, 0.1 by default), ``[B, L, H]``;
   * ``R = Transformer_main(C)`` and ``T = Transformer_esd(C)``: one extra layer each;
   * ``V1 = v1(U)``, ``V2 = v2(U)``: the visual regions ``U [B, N_v, H_v]`` projected to the
     text width by two separate linear maps;
   * *Image-aware word representation*: ``A = CMT(R -> V1)`` (words attend to regions);
   * *Word-aware visual representation*: ``Q = CMT(V2 -> R)`` (regions attend to words), then
     ``B = CMT(R -> Q)`` (words attend to the word-aware regions);
   * *Visual gate*: ``g = sigmoid(W [B; A] + b)``; fused states ``H = [B; g * A]`` ``[B, L, 2H]``,
     which the core gathers per word and the decoder (``crf``) projects to typed tag scores;
   * *Unified decoding*: final scores ``= 0.5 * main + 0.5 * convert(ESD scores)``, decoded by
     the main CRF; loss ``= main CRF + 0.5 * ESD CRF``.

Choices where the paper is vague (written down here once; the classes repeat them locally):

* Equation numbers are not cited: this reimplementation works from the paper's named parts
  (the ones in italics above), as the project's issue 3 restates them.
* Layer internals follow BERT: post-LayerNorm residual blocks, GELU feed-forward, dropout
  ``aligner.dropout`` (0.1). Heads and feed-forward width are the text encoder's own (12 and
  4 x H for BERT-base and MiniLM) unless ``aligner.num_heads`` / ``aligner.intermediate_size``
  are set; LayerNorm epsilon 1e-12 as in BERT.
* ``v1`` feeds the keys/values of ``A``; ``v2`` feeds the queries of ``Q``. ``B`` uses ``R`` (not
  ``A``) as its queries.
* The gate is element-wise (a vector of width H per sub-token), from one linear map over the
  concatenation ``[B; A]`` (equivalently ``W_b B + W_a A + b``).
* The method's defaults (``configs/umt.yaml``): the visual encoder is frozen (a fixed region
  feature extractor; ``visual_encoder.freeze=false`` fine-tunes it) and ``train.head_lr`` is
  1e-3 for everything outside the encoders (these five transformer layers included); the
  suite-wide 1e-2, chosen for a linear map and a CRF, left the visual path unused on
  ``synth-ambiguous``.
* Every visual token the visual encoder returns is a region: 49 grid cells for ``resnet152``
  (the paper's setting), CLS + 49 patches for ``clip-vit-b32``.
* Special tokens ([CLS], [SEP]) are ordinary keys/queries; sub-token padding is masked out.
* The ESD head reads ``T`` at each word's first sub-token (like the main branch). Its ``O``,
  ``B``, ``I`` scores are linear outputs (logits); the conversion is applied to these *scores*
  (not to probabilities), since the result is added to the main CRF's emission scores. The
  conversion matrix maps ``O -> O`` with weight 1 and ``B -> B-X``, ``I -> I-X`` with weight
  ``1/|types|`` (= 1/4 here) for every entity type X.
* Both CRF losses are the mean negative log-likelihood per tweet, as the core's ``crf`` decoder.
  The ESD gold tags are the typed gold tags with their type dropped (``B-X -> B``, ``I-X -> I``).
  The ESD loss is computed whenever the batch carries gold tags (training and dev alike; it is
  only added to the loss in training).
* Missing images (``Batch.image_mask`` False, or no images in the batch at all): nothing of their
  pixels reaches the visual encoder, not even through batch-norm statistics.
  ``aligner.missing_image`` decides what the model sees instead:

  - ``mask`` (default): the tweet's visual tokens are masked out of cross-attention. A query
    whose keys are all masked gets NaN from softmax (or, on some torch attention backends, zeros
    plus the output bias); instead its attention output is set to exactly zero, so the layer
    reduces to its residual path: ``A = FFN-block(LN(R))`` and
    ``B = FFN-block(LN(R))`` with each layer's own weights. The gate then sees two text-only
    views of the tweet, and ``H = [B; g * A]`` depends on the text alone (and not at all on the
    tweet's pixels). ``Q`` is still computed but nothing reads it. (Their pixels are zeroed
    before the visual encoder; with no valid image in the batch the encoder is skipped.)
  - ``empty``: the paper's "uniform empty image" protocol: a uniform grey image (RGB 128, 128,
    128, normalised with the visual encoder's ``mean``/``std``; the same image as the core's
    ``test_f1_empty_image`` protocol) is encoded and attended to like any real image.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torchcrf import CRF

from mner_bench.errors import ConfigError
from mner_bench.labels import TAGS
from mner_bench.model import (
    Aligner,
    AlignerOutput,
    Batch,
    TextEncoder,
    VisualEncoder,
    crop_tokens,
    gather_words,
)

#: the untyped tags of the entity span detection branch (``O`` first, like the typed set)
SPAN_TAGS: tuple[str, ...] = ("O", "B", "I")
MISSING_IMAGE_MODES = ("mask", "empty")


@dataclass
class UmtAlignerConfig:
    type: str = "umt"
    #: attention heads of the added layers; None: the text encoder's own (12 for BERT/MiniLM)
    num_heads: int | None = None
    #: feed-forward width of the added layers; None: the text encoder's own (4 x hidden)
    intermediate_size: int | None = None
    #: dropout inside the added layers
    dropout: float = 0.1
    #: tweets without a valid image: ``mask`` their visual tokens out of cross-attention, or
    #: ``empty``: encode a uniform grey image for them and attend to it (paper protocol)
    missing_image: str = "mask"
    #: weight of the converted ESD scores in the final scores (1 - it for the main scores)
    esd_score_weight: float = 0.5
    #: weight of the ESD CRF loss (the paper's lambda)
    esd_loss_weight: float = 0.5


# --------------------------------------------------------------------------- layers


class UmtCrossAttention(nn.Module):
    """The cross-modal transformer layer (CMT): a BERT layer with cross-attention.

    ``P = LN(X + Dropout(MHA(X, Y, Y)))``, ``out = LN(P + Dropout(W2 GELU(W1 P)))`` for queries
    ``X [B, Nq, H]`` and keys/values ``Y [B, Nk, H]``. Passing ``Y = X`` gives a plain BERT
    (self-attention) layer.

    A tweet whose keys are *all* masked (no image) gets an exactly zero attention output
    (softmax over no keys gives NaN, or zeros plus the output bias, depending on torch's attention
    backend), so its ``P`` is ``LN(X)``; no gradient reaches ``Y`` through it.
    """

    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float = 0.1, eps: float = 1e-12):
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(), nn.Linear(intermediate, hidden))
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        """``queries [B, Nq, H]``, ``keys [B, Nk, H]``, ``key_padding [B, Nk]`` (True = ignore)
        -> ``[B, Nq, H]``."""
        no_keys = key_padding.all(dim=1)  # [B]
        # Let key-less tweets attend to their (ignored) keys so that softmax stays finite, then
        # zero their output: values and gradients are exactly those of "no attention".
        key_padding = key_padding & ~no_keys[:, None]
        att, _ = self.attention(queries, keys, keys, key_padding_mask=key_padding, need_weights=False)
        att = att.masked_fill(no_keys[:, None, None], 0.0)
        p = self.norm1(queries + self.dropout(att))
        return self.norm2(p + self.dropout(self.ffn(p)))


class UmtSpanDetector(nn.Module):
    """Entity span detection head: untyped ``O/B/I`` scores, their CRF loss, and the conversion
    matrix onto the typed tags.

    :param hidden: width of the ESD branch's word states ``T``.
    :param tags: the typed tag set (``O``, ``B-PER``, ``I-PER``, ...), ``O`` anywhere.
    """

    def __init__(self, hidden: int, tags: tuple[str, ...] = TAGS):
        super().__init__()
        self.proj = nn.Linear(hidden, len(SPAN_TAGS))
        self.crf = CRF(len(SPAN_TAGS), batch_first=True)
        span_of_tag = [SPAN_TAGS.index(t.split("-", 1)[0]) for t in tags]
        types = {t.split("-", 1)[1] for t in tags if t != "O"}
        # conversion[z, y] = 1 for O -> O; 1/|types| for B -> B-X and I -> I-X; else 0.
        conversion = torch.zeros(len(SPAN_TAGS), len(tags))
        for y, z in enumerate(span_of_tag):
            conversion[z, y] = 1.0 if tags[y] == "O" else 1.0 / len(types)
        self.register_buffer("conversion", conversion, persistent=False)  # [3, T]
        self.register_buffer("span_of_tag", torch.tensor(span_of_tag), persistent=False)  # [T]

    def scores(self, words: torch.Tensor) -> torch.Tensor:
        """``[B, W, H]`` word states -> ``[B, W, 3]`` untyped tag scores."""
        return self.proj(words)

    def span_tags(self, tags: torch.Tensor) -> torch.Tensor:
        """``[B, W]`` typed tag ids -> ``[B, W]`` untyped ids (``B-X -> B``, ``I-X -> I``)."""
        return self.span_of_tag[tags]

    def loss(self, scores: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean CRF negative log-likelihood per tweet of the untyped gold path; ``tags`` are the
        *typed* gold ids ``[B, W]``, ``mask [B, W]`` a non-empty prefix per row."""
        return -self.crf(scores.float(), self.span_tags(tags), mask=mask, reduction="mean")

    def convert(self, scores: torch.Tensor) -> torch.Tensor:
        """``[B, W, 3]`` untyped scores -> ``[B, W, T]`` typed scores (spread evenly over types)."""
        return scores @ self.conversion.to(scores.dtype)


@dataclass
class UmtInteraction:
    """The multimodal interaction's states (all per sub-token).

    :ivar image_aware: ``A [B, L, H]`` words after attending to the regions ``V1``.
    :ivar word_aware_visual: ``Q [B, N_v, H]`` regions ``V2`` after attending to the words.
    :ivar visual_aware: ``B [B, L, H]`` words after attending to ``Q``.
    :ivar gate: ``g [B, L, H]`` in [0, 1].
    :ivar fused: ``H = [B; g * A]`` ``[B, L, 2H]``.
    """

    image_aware: torch.Tensor
    word_aware_visual: torch.Tensor
    visual_aware: torch.Tensor
    gate: torch.Tensor
    fused: torch.Tensor


def _text_setting(text_encoder: TextEncoder, key: str) -> int | None:
    """A size from the text encoder's Hugging Face config (heads, FFN width), when it has one."""
    hf_config = getattr(getattr(text_encoder, "model", None), "config", None)
    return getattr(hf_config, key, None)


# --------------------------------------------------------------------------- the aligner


class UmtAligner(Aligner):
    """UMT on top of a text and a visual encoder; see the module docstring for the equations.

    Returns ``hidden = H [B, L, 2H]`` for the decoder, ``losses = {"loss_esd": 0.5 * ESD NLL}``
    when the batch has gold tags, and an ``emission_fn`` that mixes the converted ESD scores
    into the decoder's typed scores.
    """

    uses_images = True

    def __init__(self, cfg: UmtAlignerConfig, text_encoder: TextEncoder, visual_encoder: VisualEncoder | None):
        super().__init__()
        if visual_encoder is None:
            raise ConfigError("aligner 'umt' needs a visual encoder: set visual_encoder.type (e.g. clip-vit-b32)")
        if cfg.missing_image not in MISSING_IMAGE_MODES:
            raise ConfigError(
                f"aligner.missing_image must be one of {', '.join(MISSING_IMAGE_MODES)}, got '{cfg.missing_image}'"
            )
        hidden = text_encoder.hidden_size
        heads = cfg.num_heads or _text_setting(text_encoder, "num_attention_heads") or 12
        if hidden % heads:
            raise ConfigError(
                f"aligner.num_heads={heads} does not divide the text width {hidden}; set aligner.num_heads"
            )
        inter = cfg.intermediate_size or _text_setting(text_encoder, "intermediate_size") or 4 * hidden

        def layer() -> UmtCrossAttention:
            return UmtCrossAttention(hidden, heads, inter, cfg.dropout)

        self.missing_image = cfg.missing_image
        self.esd_score_weight = cfg.esd_score_weight
        self.esd_loss_weight = cfg.esd_loss_weight
        self.output_size = 2 * hidden
        self.main_layer = layer()  # R
        self.esd_layer = layer()  # T
        self.v1 = nn.Linear(visual_encoder.hidden_size, hidden)
        self.v2 = nn.Linear(visual_encoder.hidden_size, hidden)
        self.text_to_image = layer()  # A = CMT(R -> V1)
        self.image_to_text = layer()  # Q = CMT(V2 -> R)
        self.text_to_word_aware_image = layer()  # B = CMT(R -> Q)
        self.gate = nn.Linear(2 * hidden, hidden)
        self.esd = UmtSpanDetector(hidden)

    # -- visual side ----------------------------------------------------------------------
    def visual_tokens(self, batch: Batch, visual_encoder: VisualEncoder) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, N, H_v]`` visual tokens and ``[B, N]`` bool: which tokens are attended to.

        ``missing_image=mask``: missing images are zeroed before encoding and masked; with no
        valid image in the batch the visual encoder is skipped (one zero token per tweet, all
        masked). ``missing_image=empty``: they are replaced by :meth:`empty_image` and attended to.
        Object crops (``Batch.crops [B, K, ...]``, where the data has them) are encoded like
        images and their tokens appended after the image's (``N = N_v (1 + K)``); an empty crop
        slot is never encoded and its tokens are masked.
        """
        n = len(batch)
        device = batch.text.input_ids.device
        if batch.images is None:
            valid = torch.zeros(n, dtype=torch.bool, device=device)
        elif batch.image_mask is None:
            valid = torch.ones(n, dtype=torch.bool, device=device)
        else:
            valid = batch.image_mask.to(device=device, dtype=torch.bool)
        has_crops = batch.crops is not None and batch.crop_mask is not None and bool(batch.crop_mask.any())
        if self.missing_image == "mask" and not bool(valid.any()) and not has_crops:
            return torch.zeros(n, 1, visual_encoder.hidden_size, device=device), torch.zeros(n, 1, dtype=torch.bool, device=device)
        size = visual_encoder.image_size
        images = batch.images if batch.images is not None else torch.zeros(n, 3, size, size, device=device)
        fill = self.empty_image(visual_encoder).to(device=device, dtype=images.dtype)
        if self.missing_image == "mask":
            fill = torch.zeros_like(fill)
        images = torch.where(valid[:, None, None, None], images, fill)
        tokens = visual_encoder(images)
        if self.missing_image == "empty":
            valid = torch.ones_like(valid)
        token_valid = valid[:, None].expand(-1, tokens.size(1))
        if has_crops:
            crops, crops_valid = crop_tokens(batch, visual_encoder, batch.crop_mask.size(1), tokens.size(1),
                                             tokens.size(2), tokens.dtype)
            tokens, token_valid = torch.cat([tokens, crops], dim=1), torch.cat([token_valid, crops_valid], dim=1)
        return tokens, token_valid

    @staticmethod
    def empty_image(visual_encoder: VisualEncoder) -> torch.Tensor:
        """``[1, 3, 1, 1]``: uniform grey (RGB 128) normalised with the encoder's ``mean``/``std``
        (an encoder without them is taken to expect ``x / 255``)."""
        mean = torch.tensor(getattr(visual_encoder, "mean", (0.0, 0.0, 0.0)), dtype=torch.float32)
        std = torch.tensor(getattr(visual_encoder, "std", (1.0, 1.0, 1.0)), dtype=torch.float32)
        return ((128.0 / 255.0 - mean) / std).view(1, 3, 1, 1)

    # -- multimodal interaction -----------------------------------------------------------
    def interact(self, r: torch.Tensor, text_padding: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor) -> UmtInteraction:
        """Image-aware words, word-aware regions, visual gate.

        :param r: ``R [B, L, H]`` main-branch text states.
        :param text_padding: ``[B, L]`` True on sub-token padding.
        :param visual: ``U [B, N_v, H_v]`` visual tokens.
        :param valid: ``[B, N_v]`` (or ``[B]``: per tweet) False where visual tokens are masked out.
        """
        visual_padding = ~valid if valid.dim() == 2 else (~valid)[:, None].expand(-1, visual.size(1))  # [B, N_v]
        a = self.text_to_image(r, self.v1(visual), visual_padding)
        q = self.image_to_text(self.v2(visual), r, text_padding)
        b = self.text_to_word_aware_image(r, q, visual_padding)
        g = torch.sigmoid(self.gate(torch.cat([b, a], dim=-1)))
        return UmtInteraction(a, q, b, g, torch.cat([b, g * a], dim=-1))

    def mix(self, converted_esd: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
        """Final typed scores ``[B, W, T]``: ``(1 - w) * main + w * converted ESD`` (w = 0.5)."""
        w = self.esd_score_weight
        return (1.0 - w) * main + w * converted_esd.to(main.dtype)

    def forward(self, batch: Batch, text_encoder: TextEncoder, visual_encoder: VisualEncoder | None) -> AlignerOutput:
        c = text_encoder(batch.text)  # [B, L, H], the encoder's last layer after its dropout
        text_padding = batch.text.attention_mask == 0
        r = self.main_layer(c, c, text_padding)
        t = self.esd_layer(c, c, text_padding)
        visual, valid = self.visual_tokens(batch, visual_encoder)
        inter = self.interact(r, text_padding, visual, valid)

        esd_scores = self.esd.scores(gather_words(t, batch.text.word_starts))  # [B, W, 3]
        losses = {}
        if batch.tags is not None:
            losses["loss_esd"] = self.esd_loss_weight * self.esd.loss(esd_scores, batch.tags, batch.text.word_mask)
        real = batch.text.attention_mask.bool()
        logs = {"umt_gate_mean": float(inter.gate.detach()[real].float().mean())}
        return AlignerOutput(
            hidden=inter.fused,
            losses=losses,
            logs=logs,
            emission_fn=partial(self.mix, self.esd.convert(esd_scores)),
        )
