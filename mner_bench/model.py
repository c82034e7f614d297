"""Component interfaces and the model that chains them: encode -> align -> decode.

Typed batches flow through the pipeline (shapes: B tweets, L sub-tokens, W words,
H hidden width, T tags):

* :class:`TextBatch` — sub-token ids and the position of each word's first sub-token;
* :class:`Batch` — text, gold tags and (for multimodal methods) images with a validity flag;
* a :class:`TextEncoder` turns sub-tokens into states ``[B, L, H]``;
* an :class:`Aligner` lets text and image interact and returns states ``[B, L, H']`` plus
  any auxiliary losses;
* the model gathers each word's first sub-token state ``[B, W, H']``;
* a :class:`Decoder` scores tags ``[B, W, T]`` (which an aligner may remap through
  :attr:`AlignerOutput.emission_fn`), gives the loss and decodes.

Words the encoder could not see (past the length limit) have ``word_mask = False``: they get
no loss and are predicted ``O``; the trainer counts them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import nn


@dataclass
class TextBatch:
    """Tokenised words of B tweets.

    :ivar input_ids: ``[B, L]`` sub-token ids (padded).
    :ivar attention_mask: ``[B, L]`` 1 for real sub-tokens, 0 for padding.
    :ivar word_starts: ``[B, W]`` index into L of each word's first sub-token (0 where absent).
    :ivar word_mask: ``[B, W]`` True where the word exists and its first sub-token fits.
    :ivar num_words: ``[B]`` words per tweet, seen or not.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_starts: torch.Tensor
    word_mask: torch.Tensor
    num_words: torch.Tensor

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class EncodedText:
    """One tweet's sub-tokens (special tokens included) and its words' first sub-token positions.

    ``len(word_starts)`` may be less than ``num_words`` when the tweet was cut at the length limit.
    """

    input_ids: list[int]
    word_starts: list[int]
    num_words: int


def collate_text(items: list[EncodedText], pad_id: int) -> TextBatch:
    """Pad encoded tweets into a :class:`TextBatch`."""
    B = len(items)
    L = max(len(it.input_ids) for it in items)
    W = max(it.num_words for it in items)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    starts = torch.zeros((B, W), dtype=torch.long)
    wmask = torch.zeros((B, W), dtype=torch.bool)
    for b, it in enumerate(items):
        n = len(it.input_ids)
        input_ids[b, :n] = torch.tensor(it.input_ids)
        attention[b, :n] = 1
        k = len(it.word_starts)
        starts[b, :k] = torch.tensor(it.word_starts, dtype=torch.long)
        wmask[b, :k] = True
    return TextBatch(input_ids, attention, starts, wmask, torch.tensor([it.num_words for it in items]))


@dataclass
class Batch:
    """A batch of tweets.

    :ivar ids: the tweets' IMGIDs.
    :ivar text: the tokenised text.
    :ivar tags: ``[B, W]`` gold tag ids (0 = ``O`` where padded), or None when unlabelled.
    :ivar images: ``[B, 3, S, S]`` preprocessed images (zeros where missing), or None.
    :ivar image_mask: ``[B]`` True where the tweet has a valid image, or None.
    :ivar crops: ``[B, K, 3, S, S]`` object crops (zeros in empty slots), or None.
    :ivar crop_mask: ``[B, K]`` True where the slot holds a valid crop, or None.
    """

    ids: list[str]
    text: TextBatch
    tags: torch.Tensor | None = None
    images: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None
    crops: torch.Tensor | None = None
    crop_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> Batch:
        def move(t):
            return None if t is None else t.to(device)

        return Batch(self.ids, self.text.to(device), move(self.tags), move(self.images), move(self.image_mask),
                     move(self.crops), move(self.crop_mask))


@dataclass
class AlignerOutput:
    """What an aligner returns.

    :ivar hidden: ``[B, L, H']`` sub-token states for the decoder.
    :ivar losses: auxiliary losses already weighted, added to the decoder's loss in training.
    :ivar logs: extra scalars to report per epoch (averaged), for example unweighted loss parts.
    :ivar emission_fn: optional hook ``[B, W, T] -> [B, W, T]`` that the model applies to the
        decoder's word-level tag scores before the loss and decoding, so that an aligner with
        its own word-level head can mix its scores in (UMT mixes in its span-detection scores).
        None (the default, and every text-only aligner) leaves the decoder's scores unchanged.
    """

    hidden: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, float] = field(default_factory=dict)
    emission_fn: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class ModelOutput:
    loss: torch.Tensor
    parts: dict[str, float]


class TextEncoder(nn.Module):
    """Sub-token encoder. Subclasses set ``hidden_size`` and ``num_layers`` and implement
    :meth:`tokenize` and :meth:`forward`."""

    hidden_size: int
    num_layers: int

    def tokenize(self, words: list[list[str]], max_length: int) -> TextBatch:  # pragma: no cover
        raise NotImplementedError

    def forward(self, text: TextBatch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class VisualEncoder(nn.Module):
    """Image encoder: ``forward(images [B,3,S,S]) -> [B, N_v, H_v]`` visual tokens."""

    hidden_size: int
    image_size: int

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class Aligner(nn.Module):
    """How text and image interact. ``output_size`` is the width of :attr:`AlignerOutput.hidden`."""

    output_size: int
    #: whether the aligner needs images in the batch (the collator loads them only then)
    uses_images: bool = False

    def forward(self, batch: Batch, text_encoder: TextEncoder, visual_encoder: VisualEncoder | None) -> AlignerOutput:  # pragma: no cover
        raise NotImplementedError

    def needs_images(self, training: bool) -> bool:
        """Whether a batch must carry images in training (``training=True``) or at evaluation and
        prediction; the batcher loads none otherwise. Default: :attr:`uses_images`."""
        return self.uses_images

    def inference_modules(self, text_encoder: TextEncoder, visual_encoder: VisualEncoder | None) -> list[nn.Module]:
        """Modules that inference runs (for ``params_inference``). Default: everything."""
        mods: list[nn.Module] = [self, text_encoder]
        if visual_encoder is not None:
            mods.append(visual_encoder)
        return mods

    def encoder_lr_modules(self) -> list[nn.Module]:
        """The aligner's modules that the optimizer trains at the encoders' learning rate
        (``train.lr``) instead of ``train.head_lr``, e.g. layers that work inside a pretrained
        encoder. Default: none."""
        return []


class Decoder(nn.Module):
    """Tag scorer, loss and decoder over word states ``[B, W, H']``."""

    def emissions(self, hidden: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """``[B, W, H'] -> [B, W, T]`` tag scores."""
        raise NotImplementedError

    def loss(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Mean loss per tweet over the words where ``mask`` is True."""
        raise NotImplementedError

    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:  # pragma: no cover
        """Best tag ids for the masked prefix of each tweet."""
        raise NotImplementedError


def crop_tokens(batch: Batch, encode, slots: int, n_tokens: int, width: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual tokens of a batch's object crops, for an aligner that appends them to the image's.

    ``encode(crops [M, 3, S, S]) -> [M, n_tokens, width]`` runs on the valid crops only. Returns
    ``(tokens [B, slots * n_tokens, width], valid [B, slots * n_tokens])``: slot k of tweet b holds
    the k-th crop's tokens; a slot without a crop (or beyond the batch's crops) is zero and
    invalid. ``slots`` may be more or fewer than ``Batch.crops`` has (extra ones are left out).
    """
    device = batch.text.input_ids.device
    tokens = torch.zeros(len(batch), slots, n_tokens, width, dtype=dtype, device=device)
    slot_valid = torch.zeros(len(batch), slots, dtype=torch.bool, device=device)
    if batch.crops is not None and batch.crop_mask is not None:
        k = min(slots, batch.crops.size(1))
        mask = batch.crop_mask[:, :k].to(device=device, dtype=torch.bool)
        if bool(mask.any()):
            slot_valid[:, :k] = mask
            tokens[:, :k][mask] = encode(batch.crops[:, :k][mask]).to(dtype)
    return tokens.flatten(1, 2), slot_valid.repeat_interleave(n_tokens, dim=1)


def gather_words(hidden: torch.Tensor, word_starts: torch.Tensor) -> torch.Tensor:
    """``[B, L, H]`` sub-token states -> ``[B, W, H]`` states of each word's first sub-token."""
    index = word_starts.unsqueeze(-1).expand(-1, -1, hidden.size(-1))
    return hidden.gather(1, index)


class MnerModel(nn.Module):
    """A method's model: text encoder, optional visual encoder, aligner and decoder."""

    def __init__(self, text_encoder: TextEncoder, aligner: Aligner, decoder: Decoder, visual_encoder: VisualEncoder | None = None):
        super().__init__()
        self.text_encoder = text_encoder
        self.visual_encoder = visual_encoder
        self.aligner = aligner
        self.decoder = decoder

    def _emissions(self, batch: Batch) -> tuple[torch.Tensor, AlignerOutput]:
        out = self.aligner(batch, self.text_encoder, self.visual_encoder)
        words = gather_words(out.hidden, batch.text.word_starts)
        emissions = self.decoder.emissions(words)
        if out.emission_fn is not None:
            emissions = out.emission_fn(emissions)
        return emissions, out

    def forward(self, batch: Batch) -> ModelOutput:
        if batch.tags is None:
            raise ValueError("training needs gold tags in the batch")
        emissions, out = self._emissions(batch)
        loss = self.decoder.loss(emissions.float(), batch.tags, batch.text.word_mask)
        parts = {"loss_decoder": float(loss.detach())}
        for name, value in out.losses.items():
            loss = loss + value
            parts[name] = float(value.detach())
        parts.update(out.logs)
        return ModelOutput(loss, parts)

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[list[int]]:
        """Tag ids for every word of every tweet (words past the length limit get 0 = ``O``)."""
        emissions, _ = self._emissions(batch)
        best = self.decoder.decode(emissions.float(), batch.text.word_mask)
        out = []
        for seq, n in zip(best, batch.text.num_words.tolist(), strict=True):
            out.append(list(seq) + [0] * (n - len(seq)))
        return out

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        seen: set[int] = set()
        inference = 0
        for mod in [*self.aligner.inference_modules(self.text_encoder, self.visual_encoder), self.decoder]:
            for p in mod.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    inference += p.numel()
        return {"params_total": total, "params_trainable": trainable, "params_inference": inference}
