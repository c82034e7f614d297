"""BGA-MNER: Bidirectional Generative Alignment for multimodal NER (Chen et al., ACM MM 2023).

The model math, top to bottom, with the paper's equation numbers. Shapes: B tweets, L text
sub-tokens, N_v visual tokens (CLIP ViT-B/32 at 224 px: 1 class token + 49 patches = 50 per
image; with ``aligner.crops=K`` each of K object-crop slots adds the crop's own 50 tokens),
d_t / d_v text / visual widths (MiniLM 384, BERT-base 768, ViT-B/32 768).

One BGA layer l (``0 <= l < N``) takes the text stream ``T^l [B, L, d_t]`` and the visual
stream ``V^l [B, N_v, d_v]`` and does:

1. **SCS** (Eq. 1, :class:`BgaContextSampler`): binary masks ``m_t^l [B, L]``, ``m_v^l [B, N_v]``
   of the tokens worth generating from / into.
2. **MCG** (Eq. 2-3, :class:`BgaGenerator`): ``V_hat^l = G_t2v(T^l, Q_v, m_t^l)`` and
   ``T_hat^l = G_v2t(V^l, Q_t, m_v^l)``; both generators are shared across layers.
3. **Reconstruction** (Eq. 5) and **cycle** (Eq. 6-7) losses (:func:`bga_kl`).
4. **Feature extractors** (Eq. 8, :class:`BgaFeatureExtractor`): ``T^(l+1)`` from attention of
   ``T^l`` over ``[T^l, V_hat^l]`` (text encoder layer l); ``V^(l+1)`` from attention of ``V^l``
   over ``[V^l, T_hat^l]`` (ViT block(s) mapped to l).

After the N BGA layers the remaining text encoder layers run plainly (one with the default
N = text layers - 1), then the core's CRF decodes. Loss (Eq. 11):
``L = L_crf + alpha * (1/N) * sum_l (L_recon^l + L_cycle^l)``.

At inference (``aligner.inference_visual=generated``, the default) the visual branch is not run
at all: no visual encoder, no visual SCS, no ``G_v2t``; the text stream attends to generated
visual features only, so passing images changes nothing.

Choices where the paper is silent or ambiguous are marked **Choice** in the docstrings and
listed in ``plugins/bga/README.md``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mner_bench.errors import ConfigError
from mner_bench.model import Aligner, AlignerOutput, Batch, TextEncoder, VisualEncoder, crop_tokens

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- configuration


@dataclass
class BgaAlignerConfig:
    type: str = "bga"
    #: Stage-refined Context Samplers (Eq. 1); false: all-ones masks (padding still excluded)
    scs: bool = True
    #: cycle-consistency losses (Eq. 6-7)
    cycle: bool = True
    #: which generator the cycle losses train (Eq. 6-7; the paper does not say): ``first``
    #: (default: only the generator that made the intermediate features, G_v2t for
    #: V_bar = G_t2v(T_hat) and G_t2v for T_bar = G_v2t(V_hat); the second one is applied with its
    #: weights held fixed, so it learns from real features alone) or ``both`` (plain autograd:
    #: the cycle gradient also trains the second generator). See :meth:`BgaAligner._losses`
    cycle_grad: str = "first"
    #: cross-modal generation (Eq. 2-8); false: no generator, no SCS, no visual branch (= BERT-CRF)
    mcg: bool = True
    #: visual features the text stream attends to at eval/predict time: generated (image-free) or real
    inference_visual: str = "generated"
    #: weight of the generation losses (Eq. 11)
    alpha: float = 0.001
    #: how features become distributions for the KL of Eq. 5-7: softmax over the feature
    #: dimension of each token (``feature``) or over the token positions of each feature (``token``)
    kl_softmax: str = "feature"
    #: object-crop slots in the visual stream (the paper's "global image + detected objects"):
    #: each adds the crop's ViT input tokens after the image's (N_v grows by the encoder's tokens
    #: per slot, and so do G_t2v's queries Q_v and image-free inference); missing crops are masked.
    #: 0 (default): the image only. Needs crops in the data (``data.crop_dir`` / ``--crop-dir``)
    crops: int = 0
    #: N, the number of BGA layers; default (null): text encoder layers - 1
    bga_layers: int | None = None
    #: length of the learnable text queries Q_t (>= the longest batch in sub-tokens, data.max_length)
    text_queries: int = 128
    #: transformer decoder layers per generator
    mcg_layers: int = 1
    #: feed-forward width of the generators' decoder layers; 2048 (PyTorch's
    #: ``TransformerDecoderLayer`` default) gives G_t2v the paper's 7.9M parameters at width 768
    mcg_ff: int = 2048
    #: attention head width in the generators (heads = width / mcg_head_dim)
    mcg_head_dim: int = 64
    #: SCS masks only shrink from layer to layer (m^l = sample * m^(l-1)) instead of being re-sampled
    scs_cumulative: bool = False
    #: Gumbel-softmax temperature of the SCS
    scs_tau: float = 1.0
    #: keep probability of every token when training starts (the bias of MLP_c's keep logit):
    #: the SCS starts near m^0 = all ones and learns which tokens to drop. 0.5: no bias (the
    #: random MLP alone decides, which can drop every token of a layer; see BgaContextSampler)
    scs_init_keep: float = 0.9
    #: stop gradients into the real features that the KL losses compare against
    detach_targets: bool = False
    #: train the BGA modules (SCS, generators, projections) at the encoders' train.lr, as the
    #: paper trains everything at 3e-5; false: at train.head_lr like the CRF
    encoder_lr: bool = True
    dropout: float = 0.1


# --------------------------------------------------------------------------- masked attention


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                     dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Multi-head attention whose keys are weighted by a 0/1 mask that may carry a gradient.

    ``q [B, h, n, e]``, ``k``/``v [B, h, S, e]``, ``key_mask [B, S]`` float in {0, 1} (possibly a
    straight-through Gumbel sample). Returns ``[B, h, n, e]``.

    The masked softmax is written as ``exp(s) * m / sum(exp(s) * m)`` (DynamicViT's attention
    masking) so that in the forward pass it equals a softmax over the kept keys (the ``0 / -inf``
    attention mask of Eq. 2-3) while the mask's straight-through gradient still reaches the SCS.
    Every row must keep at least one key (the SCS always keeps the first token).
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    m = key_mask[:, None, None, :].to(scores.dtype)
    kept_max = scores.masked_fill(m == 0, float("-inf")).amax(-1, keepdim=True).detach()
    # dropped keys may score above the kept maximum: clamp so exp() cannot overflow (0 * inf)
    weights = torch.exp((scores - kept_max).clamp(max=0.0)) * m
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    weights = F.dropout(weights, dropout, training)
    return weights @ v


# --------------------------------------------------------------------------- SCS (Eq. 1)


class BgaContextSampler(nn.Module):
    """Stage-refined Context Sampler of one modality at one layer (Eq. 1).

    ``z = MLP_a(X^l)`` local features ``[B, N, d/2]``; ``g = avgpool_{m^(l-1)}(MLP_b(X^l))`` global
    context over the tokens kept at the previous stage ``[B, d/2]``; ``p = softmax(MLP_c([z, g]))``
    keep/drop probabilities ``[B, N, 2]``; the mask ``m^l [B, N]`` is a hard Gumbel-softmax
    sample of ``p`` with the straight-through gradient in training, ``argmax p`` at eval.

    **Choices**: the MLP sizes follow DynamicViT's predictor (LayerNorm, d -> d/2 for a and b,
    d -> d/2 -> d/4 -> 2 for c; about 1M parameters per layer at d = 768, the paper's 11.5M for
    11 textual SCS). Padding is never kept. The first token ([CLS] / the ViT class token) is
    always kept, so that the generator's attention always has a key. By default each stage
    re-samples its mask (``scs_cumulative=false``); ``scs_cumulative=true`` only lets it
    shrink (DynamicViT-style ``m^l = sample * m^(l-1)``).

    **Choice** (``aligner.scs_init_keep``, default 0.9): MLP_c's output bias starts at
    ``log(p / (1 - p))`` on the keep logit, so that every token starts kept with probability
    about ``p`` and the SCS learns what to drop. Without it the random MLP decides: measured on
    synth-consistent with MiniLM, 2 of the 5 textual SCS dropped every token but [CLS] of every
    test tweet at eval (argmax) at initialisation, so G_t2v saw no word at those layers; the
    SCS learns only through the alpha-weighted generation losses, so such a layer can stay blind.
    """

    def __init__(self, size: int, tau: float = 1.0, cumulative: bool = False, init_keep: float = 0.9):
        super().__init__()
        half = max(size // 2, 2)
        self.norm = nn.LayerNorm(size)
        self.mlp_a = nn.Sequential(nn.Linear(size, half), nn.GELU())
        self.mlp_b = nn.Sequential(nn.Linear(size, half), nn.GELU())
        self.mlp_c = nn.Sequential(nn.Linear(2 * half, half), nn.GELU(), nn.Linear(half, max(half // 2, 2)), nn.GELU(),
                                   nn.Linear(max(half // 2, 2), 2))
        if not 0.0 < init_keep < 1.0:
            raise ConfigError(f"aligner.scs_init_keep must be a probability strictly between 0 and 1, got {init_keep}")
        with torch.no_grad():  # logits [keep, drop]: softmax gives keep with probability init_keep
            self.mlp_c[-1].bias.copy_(torch.tensor([math.log(init_keep / (1.0 - init_keep)), 0.0]))
        self.tau = tau
        self.cumulative = cumulative

    def logits(self, x: torch.Tensor, prev_mask: torch.Tensor) -> torch.Tensor:
        """``x [B, N, d]``, ``prev_mask [B, N]`` (m^(l-1)) -> keep/drop logits ``[B, N, 2]``."""
        x = self.norm(x)
        z = self.mlp_a(x)
        b = self.mlp_b(x)
        w = prev_mask.to(b.dtype).unsqueeze(-1)
        g = (b * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)
        return self.mlp_c(torch.cat([z, g.expand_as(z)], dim=-1))

    def forward(self, x: torch.Tensor, prev_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``x [B, N, d]``, ``prev_mask [B, N]`` float, ``valid [B, N]`` bool -> ``m^l [B, N]`` float
        in {0, 1} (with the straight-through gradient in training)."""
        logits = self.logits(x, prev_mask).float()
        if self.training:
            keep = F.gumbel_softmax(logits, tau=self.tau, hard=True)[..., 0]
        else:
            keep = (logits[..., 0] >= logits[..., 1]).float()
        keep = keep * valid.float()
        keep = torch.cat([torch.ones_like(keep[:, :1]), keep[:, 1:]], dim=1)  # first token always kept
        if self.cumulative:
            keep = keep * prev_mask.float()
        return keep


# --------------------------------------------------------------------------- MCG (Eq. 2-3)


class BgaDecoderLayer(nn.Module):
    """One pre-LN transformer decoder layer: self-attention over the queries, attention to the
    masked source (Eq. 2-3), feed-forward. ``x [B, n, d]``, ``source [B, S, d]``, ``source_mask
    [B, S]`` -> ``[B, n, d]``."""

    def __init__(self, size: int, heads: int, dropout: float, ff: int | None = None):
        super().__init__()
        ff = ff or 4 * size
        self.heads = heads
        self.dropout = dropout
        self.norm_self = nn.LayerNorm(size)
        self.self_attn = nn.MultiheadAttention(size, heads, dropout=dropout, batch_first=True)
        self.norm_q = nn.LayerNorm(size)
        self.norm_kv = nn.LayerNorm(size)
        self.w_q = nn.Linear(size, size)
        self.w_k = nn.Linear(size, size)
        self.w_v = nn.Linear(size, size)
        self.w_o = nn.Linear(size, size)
        self.norm_ff = nn.LayerNorm(size)
        self.ff = nn.Sequential(nn.Linear(size, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, size))
        self.drop = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, n, d = x.shape
        return x.view(B, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, source: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """``x [B or 1, n, d]``: a batch of one (the learnable queries, the same for every
        tweet) is broadcast over the source's batch after the parts that do not depend on it."""
        return self.attend(*self.query_part(x), source, source_mask)

    def query_part(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What does not depend on the source: self-attention over ``x`` and the attention
        queries from it (``x [B, n, d]`` -> ``x``, ``q [B, h, n, e]``)."""
        h = self.norm_self(x)
        x = x + self.drop(self.self_attn(h, h, h, need_weights=False)[0])
        # Eq. 2-3: Q from the queries; K and V from the kept source tokens (Eq. 3 as printed
        # takes V from the queries, Q_v W_V; it must be T^l W_V for the shapes to agree)
        return x, self._split(self.w_q(self.norm_q(x)))

    def attend(self, x: torch.Tensor, q: torch.Tensor, source: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """The rest of the layer, on the output of :meth:`query_part`."""
        if q.size(0) != source.size(0):
            q, x = q.expand(source.size(0), -1, -1, -1), x.expand(source.size(0), -1, -1)
        s = self.norm_kv(source)
        k, v = self._split(self.w_k(s)), self._split(self.w_v(s))
        att = masked_attention(q, k, v, source_mask, self.dropout, self.training)
        x = x + self.drop(self.w_o(att.transpose(1, 2).reshape(x.shape)))
        return x + self.drop(self.ff(self.norm_ff(x)))


class BgaGenerator(nn.Module):
    """A cross-modal generator G_src->tgt of the MCG (Eq. 2-3): a transformer decoder whose
    queries are learnable ``Q [num_queries, d_tgt]`` and whose keys/values are the source tokens
    kept by the source mask.

    ``forward(source [B, S, d_src], source_mask [B, S], n)`` -> generated target tokens
    ``[B, n, d_tgt]`` (``n <= num_queries``: G_v2t cuts Q_t to the batch's L).

    **Choices**: the decoder works at the target width, so its output lies in the target's
    feature space (the KL losses compare it with the real target features); where the widths
    differ the source is first projected by a linear layer. Pre-LN layers without a final norm,
    so that the output can take the scale of either stream (BERT's post-LN states, ViT's
    residual stream). One layer by default (``aligner.mcg_layers``), feed-forward width 2048
    (``aligner.mcg_ff``; with PyTorch's ``TransformerDecoderLayer`` sizes G_t2v has the paper's
    7.9M parameters at width 768).
    """

    def __init__(self, source_size: int, target_size: int, num_queries: int, layers: int = 1,
                 head_dim: int = 64, dropout: float = 0.1, ff: int | None = None):
        super().__init__()
        heads = max(1, target_size // head_dim)
        while target_size % heads:
            heads -= 1
        self.queries = nn.Parameter(torch.randn(num_queries, target_size) * 0.02)
        self.source_proj = nn.Linear(source_size, target_size) if source_size != target_size else nn.Identity()
        self.layers = nn.ModuleList(BgaDecoderLayer(target_size, heads, dropout, ff) for _ in range(layers))

    @property
    def num_queries(self) -> int:
        return self.queries.size(0)

    def forward(self, source: torch.Tensor, source_mask: torch.Tensor, n: int) -> torch.Tensor:
        if n > self.num_queries:
            raise ConfigError(
                f"aligner.text_queries={self.num_queries} is shorter than a batch of {n} sub-tokens; "
                f"set aligner.text_queries to at least data.max_length"
            )
        source = self.source_proj(source)
        x = self.queries[:n].to(source.dtype).unsqueeze(0)
        first, rest = self.layers[0], self.layers[1:]
        if self.training:
            # dropout must draw per tweet; in eval the first layer's query self-attention and
            # query projection do not depend on the tweet and run once for the whole batch,
            # and without autograd once until the weights change (:meth:`_constant_part`)
            x, q = first.query_part(x.expand(source.size(0), -1, -1))
        else:
            x, q = self._constant_part(x)
        x = first.attend(x, q, source, source_mask)
        for layer in rest:
            x = layer(x, source, source_mask)
        return x

    def _constant_part(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's :meth:`~BgaDecoderLayer.query_part` of the queries ``x [1, n, d]``
        in eval mode. Without autograd it is kept and reused (G_t2v runs at each of the N BGA
        layers, and again for each batch) while the same weights, dtype, device and autocast
        settings apply: the key holds each weight's identity and in-place version counter, which
        an optimizer step or ``load_state_dict`` bumps."""
        first = self.layers[0]
        if torch.is_grad_enabled():
            return first.query_part(x)
        dev = x.device.type
        weights = [self.queries, *first.norm_self.parameters(), *first.self_attn.parameters(),
                   *first.norm_q.parameters(), *first.w_q.parameters()]
        key = (x.shape, x.dtype, x.device, torch.is_inference_mode_enabled(), torch.is_autocast_enabled(dev),
               torch.get_autocast_dtype(dev), tuple((id(w), w._version) for w in weights))
        cached = self.__dict__.get("_constant_cache")
        if cached is None or cached[0] != key:
            cached = (key, first.query_part(x))
            self.__dict__["_constant_cache"] = cached  # not a buffer: never saved or moved
        return cached[1]


def _fixed_weights(module: nn.Module):
    """``module``'s forward with its parameters detached: gradients flow through it to its
    inputs but not into its weights (for ``aligner.cycle_grad=first``)."""
    from torch.func import functional_call

    params = {k: p.detach() for k, p in module.named_parameters()}

    def call(*args):
        return functional_call(module, params, args)

    return call


# --------------------------------------------------------------------------- losses (Eq. 5-7)


def bga_kl(generated: torch.Tensor, real: torch.Tensor, weight: torch.Tensor, softmax: str = "feature") -> torch.Tensor:
    """``KL(generated || real)`` summed over the positions where ``weight`` is 1 (Eq. 5-7).

    ``generated``/``real [B, N, d]``, ``weight [B, N]`` (the target modality's mask) -> ``[B]``
    per tweet. The paper does not say how features become distributions. ``softmax=feature``
    (default): each token's feature vector through a softmax over d, KL per token, summed over
    the weighted tokens. ``softmax=token``: each feature channel through a softmax over the
    weighted tokens, KL per channel, summed over channels. Computed in fp32.
    """
    gen, tgt, w = generated.float(), real.float(), weight.float()
    if softmax == "feature":
        log_p_gen = F.log_softmax(gen, dim=-1)
        log_p_real = F.log_softmax(tgt, dim=-1)
        kl = (log_p_gen.exp() * (log_p_gen - log_p_real)).sum(-1)
        return (kl * w).sum(-1)
    if softmax == "token":
        keep = (w > 0).unsqueeze(-1)
        # dropped positions get a large finite logit gap, not -inf: exp() makes their probability
        # exactly 0, and (unlike -inf - -inf) their terms and gradients stay finite
        log_p_gen = F.log_softmax(gen.masked_fill(~keep, -1e4), dim=1)
        log_p_real = F.log_softmax(tgt.masked_fill(~keep, -1e4), dim=1)
        terms = log_p_gen.exp() * (log_p_gen - log_p_real)
        return terms.masked_fill(~keep, 0.0).sum(dim=(1, 2))
    raise ConfigError(f"aligner.kl_softmax must be 'feature' or 'token', got '{softmax}'")


# --------------------------------------------------------------------------- feature extractors (Eq. 8)


def run_layer(layer: nn.Module, x: torch.Tensor, x_valid: torch.Tensor,
              extra: torch.Tensor | None = None, extra_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Run one pretrained transformer layer with queries from ``x [B, n, d]`` and keys/values
    from ``[x, extra]`` (``extra [B, k, d]`` or None for a plain layer); ``x_valid [B, n]`` /
    ``extra_valid [B, k]`` bool mark the keys that exist (padding is never attended to).

    Two layer kinds, run from their own sub-modules so that the keys/values can be extended:
    a BERT layer (``transformers`` ``BertLayer``: post-LN, ``attention.self.query/key/value``)
    and an open_clip ``ResidualAttentionBlock`` (pre-LN, ``ln_1``/``attn``/``ln_2``/``mlp``; the
    CLIP ViT's blocks). With ``extra=None`` the result equals the layer's own forward.
    """
    kv_valid = x_valid if extra is None else torch.cat([x_valid, extra_valid], dim=1)
    if hasattr(layer, "attention") and hasattr(layer, "feed_forward_chunk"):  # BertLayer
        att = layer.attention.self
        B, n, _ = x.shape
        kv = x if extra is None else torch.cat([x, extra], dim=1)
        h, e = att.num_attention_heads, att.attention_head_size
        q = att.query(x).view(B, n, h, e).transpose(1, 2)
        k = att.key(kv).view(B, kv.size(1), h, e).transpose(1, 2)
        v = att.value(kv).view(B, kv.size(1), h, e).transpose(1, 2)
        p = att.dropout.p if layer.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_valid[:, None, None, :], dropout_p=p)
        ctx = ctx.transpose(1, 2).reshape(B, n, h * e)
        out = layer.attention.output(ctx, x)
        return layer.feed_forward_chunk(out)
    if hasattr(layer, "ln_1") and isinstance(getattr(layer, "attn", None), nn.MultiheadAttention):  # open_clip
        q = layer.ln_1(x)
        kv = q if extra is None else layer.ln_1(torch.cat([x, extra], dim=1))
        if not layer.attn.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        a = layer.attn(q, kv, kv, need_weights=False, key_padding_mask=~kv_valid)[0]
        if not layer.attn.batch_first:
            a = a.transpose(0, 1)
        x = x + layer.ls_1(a)
        return x + layer.ls_2(layer.mlp(layer.ln_2(x)))
    raise ConfigError(
        f"the BGA aligner cannot extend the attention of a {type(layer).__name__} layer: it supports "
        f"BERT-style text layers and open_clip ResidualAttentionBlock visual blocks"
    )


class BgaFeatureExtractor(nn.Module):
    """Feature extractor of one modality at one BGA layer (Eq. 8).

    ``X^(l+1) = Layer_l(Q = X^l, K = V = [X^l, bridge(Y_gen^l)])`` where ``X^l [B, n, d_own]`` is
    the own stream and ``Y_gen^l [B, k, d_other]`` the tokens generated for the other modality
    (``V_hat^l`` for the text stream, ``T_hat^l`` for the visual one).

    The extractor runs the pretrained layer's *own* weights (text encoder layer l, ViT block
    ``block_indices[-1]``), fetched from the encoder at call time: it is initialised from that
    layer and fine-tuned in place (at the encoder's learning rate), so no copy of it exists and
    the model's size is the paper's (encoder + SCS + generators). ``bridge`` projects the other
    modality's width to the own one where they differ (MiniLM 384 vs ViT 768), else identity.

    **Layer mapping** (when the streams' layer counts differ): BGA layer l ends at ViT depth
    ``floor((l+1) * L_v / L_t)`` (L_t text layers, L_v ViT blocks); the ViT blocks between the
    previous depth and that one run plainly, the last of them is the extractor. MiniLM (6) with
    ViT-B/32 (12): BGA layer l runs block 2l plainly and block 2l+1 as the extractor (blocks
    10 and 11 stay unused, like block 12 in the paper's 11-layer BERT-base set-up). With equal
    counts this is the paper's one-to-one mapping.
    """

    def __init__(self, own_size: int, other_size: int, block_indices: list[int]):
        super().__init__()
        self.bridge = nn.Linear(other_size, own_size) if other_size != own_size else nn.Identity()
        self.block_indices = list(block_indices)

    def forward(self, layers: nn.ModuleList, x: torch.Tensor, x_valid: torch.Tensor,
                generated: torch.Tensor, generated_valid: torch.Tensor) -> torch.Tensor:
        for i in self.block_indices[:-1]:
            x = run_layer(layers[i], x, x_valid)
        return run_layer(layers[self.block_indices[-1]], x, x_valid, self.bridge(generated), generated_valid)


def map_layers(text_layers: int, visual_layers: int, n: int) -> list[list[int]]:
    """The ViT blocks each of the ``n`` BGA layers runs (see :class:`BgaFeatureExtractor`)."""
    groups, start = [], 0
    for layer in range(n):
        end = max((layer + 1) * visual_layers // text_layers, start + 1)
        if end > visual_layers:
            raise ConfigError(
                f"aligner.bga_layers={n}: the visual encoder has only {visual_layers} blocks for {n} BGA layers"
            )
        groups.append(list(range(start, end)))
        start = end
    return groups


# --------------------------------------------------------------------------- the aligner


@dataclass
class BgaStreams:
    """What one forward pass of the BGA layers produced (for the losses and the analysis).

    :ivar text: ``[B, L, d_t]`` the text stream after the N BGA layers.
    :ivar generated_visual: per layer ``V_hat^l [B, N_v, d_v]``.
    :ivar real_visual: per layer ``V^l [B, N_v, d_v]`` (empty when the visual branch did not run).
    :ivar text_masks: per layer ``m_t^l [B, L]``; ``visual_masks`` likewise ``[B, N_v]``.
    :ivar recon: per layer ``[B]`` L_recon^l per tweet (Eq. 5); ``cycle`` likewise (Eq. 6-7).
    """

    text: torch.Tensor
    generated_visual: list[torch.Tensor]
    real_visual: list[torch.Tensor]
    text_masks: list[torch.Tensor]
    visual_masks: list[torch.Tensor]
    recon: list[torch.Tensor]
    cycle: list[torch.Tensor]


class BgaAligner(Aligner):
    """N BGA layers, then the text encoder's remaining layers plainly (Eq. 1-11).

    The text encoder must be BERT-style (``embed``, ``layers``); the visual encoder must give
    ``embed(images) [B, N_v, d_v]``, ``blocks``, ``hidden_size`` and ``num_tokens``.
    ``aligner.mcg=false`` keeps none of the BGA modules: the text encoder runs as in BERT-CRF.
    """

    uses_images = True

    def __init__(self, cfg: BgaAlignerConfig, text_encoder: TextEncoder, visual_encoder: VisualEncoder | None,
                 inference_dims: tuple[int, int, int] | None = None):
        """``inference_dims`` = (width, tokens, blocks or None) of the visual encoder builds the
        image-free inference model without it: no visual SCS, no ``G_v2t``, no visual
        extractors (their state-dict prefixes are in :attr:`skipped_at_inference`)."""
        super().__init__()
        self.skipped_at_inference: list[str] = []
        if cfg.inference_visual not in ("generated", "real"):
            raise ConfigError(f"aligner.inference_visual must be 'generated' or 'real', got '{cfg.inference_visual}'")
        if cfg.cycle_grad not in ("both", "first"):
            raise ConfigError(f"aligner.cycle_grad must be 'both' or 'first', got '{cfg.cycle_grad}'")
        if cfg.kl_softmax not in ("feature", "token"):
            raise ConfigError(f"aligner.kl_softmax must be 'feature' or 'token', got '{cfg.kl_softmax}'")
        if cfg.alpha < 0:
            raise ConfigError(f"aligner.alpha must be >= 0, got {cfg.alpha}")
        if cfg.crops < 0:
            raise ConfigError(f"aligner.crops must be >= 0 (object-crop slots), got {cfg.crops}")
        self.crop_slots = cfg.crops
        self.output_size = text_encoder.hidden_size
        self.mcg = cfg.mcg
        self.scs = cfg.scs and cfg.mcg
        self.cycle = cfg.cycle and cfg.mcg
        self.cycle_grad = cfg.cycle_grad
        self.alpha = cfg.alpha
        self.kl_softmax = cfg.kl_softmax
        self.inference_visual = cfg.inference_visual
        self.detach_targets = cfg.detach_targets
        self.encoder_lr = cfg.encoder_lr
        if not cfg.mcg:
            self.uses_images = False
            self.num_bga_layers = 0
            return
        for attr in ("embed", "layers"):
            if not hasattr(text_encoder, attr):
                raise ConfigError(f"aligner.type=bga needs a BERT-style text encoder with '{attr}' (text_encoder.type=hf)")
        text_only = visual_encoder is None and inference_dims is not None
        if text_only:
            if cfg.inference_visual != "generated":
                raise ConfigError("aligner.inference_visual=real needs the visual encoder at inference")
            dv, nv, lv = inference_dims  # nv: G_t2v's queries, crop slots included
            self.uses_images = False
        else:
            if visual_encoder is None:
                raise ConfigError("aligner.type=bga needs a visual encoder (visual_encoder.type=clip-vit-b32), "
                                  "or aligner.mcg=false for the text-only ablation")
            for attr in ("embed", "blocks", "num_tokens"):
                if not hasattr(visual_encoder, attr):
                    raise ConfigError(f"aligner.type=bga needs a visual encoder with '{attr}' (a ViT such as clip-vit-b32)")
            dv, lv = visual_encoder.hidden_size, len(visual_encoder.blocks)
            nv = visual_encoder.num_tokens * (1 + cfg.crops)
        lt, dt = text_encoder.num_layers, text_encoder.hidden_size
        n = cfg.bga_layers if cfg.bga_layers is not None else lt - 1
        if not 1 <= n <= lt:
            raise ConfigError(f"aligner.bga_layers must be between 1 and the text encoder's {lt} layers, got {n}")
        self.num_bga_layers = n
        if self.scs:
            self.text_scs = nn.ModuleList(BgaContextSampler(dt, cfg.scs_tau, cfg.scs_cumulative, cfg.scs_init_keep) for _ in range(n))
        self.g_t2v = BgaGenerator(dt, dv, nv, cfg.mcg_layers, cfg.mcg_head_dim, cfg.dropout, cfg.mcg_ff)
        self.text_extractors = nn.ModuleList(BgaFeatureExtractor(dt, dv, [i]) for i in range(n))
        if text_only:
            self.skipped_at_inference = ["aligner.visual_scs.", "aligner.g_v2t.", "aligner.visual_extractors."]
            return
        if self.scs:
            self.visual_scs = nn.ModuleList(BgaContextSampler(dv, cfg.scs_tau, cfg.scs_cumulative, cfg.scs_init_keep) for _ in range(n))
        groups = map_layers(lt, lv, n)
        self.g_v2t = BgaGenerator(dv, dt, cfg.text_queries, cfg.mcg_layers, cfg.mcg_head_dim, cfg.dropout, cfg.mcg_ff)
        self.visual_extractors = nn.ModuleList(BgaFeatureExtractor(dv, dt, g) for g in groups)

    # -- what inference runs --------------------------------------------------------------
    def mode(self, batch: Batch) -> str:
        """How this call runs: ``generate`` (training: the visual branch with both generators
        and the losses), ``real`` (eval with ``inference_visual=real``: the text stream attends
        to real visual features) or ``text`` (image-free: no visual module runs). A batch
        without any valid image always runs ``text``."""
        if (not hasattr(self, "g_v2t") or batch.images is None
                or (batch.image_mask is not None and not bool(batch.image_mask.any()))):
            return "text"
        if self.training:
            return "generate"
        return "real" if self.inference_visual == "real" else "text"

    def needs_images(self, training: bool) -> bool:
        """Images are read in training and, at evaluation, only with ``inference_visual=real``:
        image-free evaluation does not load them at all."""
        return self.uses_images and (training or self.inference_visual == "real")

    def inference_modules(self, text_encoder, visual_encoder=None) -> list[nn.Module]:
        """Image-free inference runs the text encoder, the textual SCS, G_t2v and the text
        extractors' bridges; ``inference_visual=real`` adds the visual encoder and the visual
        extractors' bridges (never the visual SCS or G_v2t)."""
        if not self.mcg:
            return [self, text_encoder]
        mods: list[nn.Module] = [text_encoder, self.g_t2v, self.text_extractors]
        if self.scs:
            mods.append(self.text_scs)
        if self.inference_visual == "real" and visual_encoder is not None:
            mods += [visual_encoder, self.visual_extractors]
        return mods

    def encoder_lr_modules(self) -> list[nn.Module]:
        """With ``aligner.encoder_lr`` (default) every BGA module trains at ``train.lr``: they
        work inside the pretrained encoders (the extractors' projections feed their attention),
        and the core's ``train.head_lr`` (1e-2, chosen for the CRF) stalled few-shot training
        (measured: t15, 50 shots, train loss flat at ~14 and dev F1 0.0 for 5 epochs)."""
        return [self] if self.encoder_lr else []

    # -- the BGA layers ---------------------------------------------------------------------
    def streams(self, batch: Batch, text_encoder, visual_encoder=None, mode: str | None = None) -> BgaStreams:
        """Run the N BGA layers (Eq. 1-8) and collect what they produced. ``mode`` (default
        :meth:`mode`) may be forced, e.g. to ``generate`` in eval mode for the alignment analysis."""
        mode = mode or self.mode(batch)
        if (mode != "text" and batch.crops is not None and not self.crop_slots
                and not getattr(self, "_warned_crops", False)):
            self._warned_crops = True
            log.warning("the data has object crops but aligner.crops=0: bga's visual stream is the image's "
                        "%d ViT tokens only; set aligner.crops=K (e.g. data.max_crops) to add them",
                        self.g_t2v.num_queries)
        text_valid = batch.text.attention_mask.bool()
        B, L = text_valid.shape
        t = text_encoder.embed(batch.text)  # T^0 [B, L, d_t]
        v = None
        if mode != "text":
            v = visual_encoder.embed(batch.images).to(t.dtype)  # V^0 [B, N_v, d_v]
            v_valid = torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)
            if self.crop_slots:
                # each crop's ViT input tokens (like the image's), slot by slot; empty slots invalid
                crops, crops_valid = crop_tokens(batch, visual_encoder.embed, self.crop_slots, v.size(1),
                                                 visual_encoder.hidden_size, v.dtype)
                v, v_valid = torch.cat([v, crops], 1), torch.cat([v_valid, crops_valid], 1)
            has_image = (batch.image_mask.bool() if batch.image_mask is not None
                         else torch.ones(B, dtype=torch.bool, device=t.device))
        gen_valid = torch.ones(B, self.g_t2v.num_queries, dtype=torch.bool, device=t.device)
        mt_prev, mv_prev = text_valid.float(), None if v is None else v_valid.float()
        out = BgaStreams(t, [], [], [], [], [], [])
        for layer in range(self.num_bga_layers):
            # Eq. 1: which tokens to generate from
            mt = self.text_scs[layer](t, mt_prev, text_valid) if self.scs else text_valid.float()
            # Eq. 2: V_hat^l = G_t2v(T^l, Q_v, m_t^l)
            v_hat = self.g_t2v(t, mt, self.g_t2v.num_queries)
            out.generated_visual.append(v_hat)
            out.text_masks.append(mt)
            t_next_kv, kv_valid = v_hat, gen_valid
            if v is not None:
                mv = self.visual_scs[layer](v, mv_prev, v_valid) if self.scs and mode == "generate" else v_valid.float()
                out.real_visual.append(v)
                out.visual_masks.append(mv)
                if mode == "real":
                    # Table 4's "real visual": the text stream attends to V^l (generated where no image)
                    t_next_kv = torch.where(has_image[:, None, None], v, v_hat)
                    kv_valid = torch.where(has_image[:, None], v_valid, gen_valid)  # no empty crop slot
                    t_for_visual = t
                else:
                    # Eq. 3: T_hat^l = G_v2t(V^l, Q_t, m_v^l)
                    t_hat = self.g_v2t(v, mv, L)
                    t_for_visual = t_hat
                    self._losses(out, t, v, t_hat, v_hat, mt, mv, text_valid, v_valid, has_image)
                # Eq. 8 (visual): V^(l+1) from V^l over [V^l, T_hat^l]
                v_next = self.visual_extractors[layer](visual_encoder.blocks, v, v_valid, t_for_visual, text_valid)
                mv_prev = mv
            # Eq. 8 (text): T^(l+1) from T^l over [T^l, V_hat^l]
            t = self.text_extractors[layer](text_encoder.layers, t, text_valid, t_next_kv, kv_valid)
            if v is not None:
                v = v_next
            mt_prev = mt
        out.text = t
        return out

    def _losses(self, out: BgaStreams, t, v, t_hat, v_hat, mt, mv, text_valid, v_valid, has_image) -> None:
        """Eq. 5 (reconstruction) and Eq. 6-7 (cycle) of one layer, per tweet ``[B]``; tweets
        without a valid image get 0. **Choice**: the masks weight the losses as constants (no
        gradient), so that the SCS is not rewarded for dropping the tokens hardest to generate;
        the SCS learns through the generators' attention (Eq. 2-3).

        **Choice** (``aligner.cycle_grad``): the paper does not say which generator the cycle
        losses train. ``both`` lets the gradient reach both. ``first`` applies the second
        generator of each cycle with its weights held fixed (the gradient still flows through it
        to the intermediate features): the cycle then asks G_v2t for a T_hat from which G_t2v,
        as trained on real text, regenerates the image, and G_t2v for a V_hat from which G_v2t
        regenerates the text, while G_t2v itself never learns to read generated text (which
        carries the image it came from). Measured on synth-consistent (see the README): with
        ``both`` the generated features single out the own image far less often."""
        tgt_t, tgt_v = (t.detach(), v.detach()) if self.detach_targets else (t, v)
        w_t, w_v = mt.detach(), mv.detach()
        img = has_image.float()
        recon = bga_kl(v_hat, tgt_v, w_v, self.kl_softmax) + bga_kl(t_hat, tgt_t, w_t, self.kl_softmax)
        out.recon.append(recon * img)
        if self.cycle:
            # Eq. 6-7: V_bar = G_t2v(T_hat, Q_v, 1), T_bar = G_v2t(V_hat, Q_t, 1); "1" = every
            # existing token (**choice**: padding positions of T_hat are not used)
            g_t2v, g_v2t = self.g_t2v, self.g_v2t
            if self.cycle_grad == "first":
                g_t2v, g_v2t = _fixed_weights(g_t2v), _fixed_weights(g_v2t)
            v_bar = g_t2v(t_hat, text_valid.float(), self.g_t2v.num_queries)
            t_bar = g_v2t(v_hat, v_valid.float(), t.size(1))
            cyc = bga_kl(v_bar, tgt_v, w_v, self.kl_softmax) + bga_kl(t_bar, tgt_t, w_t, self.kl_softmax)
            out.cycle.append(cyc * img)

    def forward(self, batch: Batch, text_encoder, visual_encoder=None) -> AlignerOutput:
        if not self.mcg:
            return AlignerOutput(hidden=text_encoder(batch.text))
        s = self.streams(batch, text_encoder, visual_encoder)
        valid = batch.text.attention_mask.bool()
        t = s.text
        for layer in text_encoder.layers[self.num_bga_layers:]:  # the plain transformer layer(s)
            t = run_layer(layer, t, valid)
        t = getattr(text_encoder, "dropout", nn.Identity())(t)
        if not self.training:
            return AlignerOutput(hidden=t)
        # Eq. 11: alpha * (1/N) * sum_l (L_recon^l + L_cycle^l), averaged over tweets with an image
        zero = t.new_zeros((), dtype=torch.float32)
        if not s.recon:
            return AlignerOutput(hidden=t, losses={"loss_bga": zero})
        has_image = batch.image_mask.float() if batch.image_mask is not None else torch.ones(len(batch), device=t.device)
        n_img = has_image.sum().clamp_min(1.0)
        n = self.num_bga_layers
        recon = torch.stack([r.sum() for r in s.recon]).sum() / (n * n_img)
        cycle = torch.stack([c.sum() for c in s.cycle]).sum() / (n * n_img) if s.cycle else zero
        logs = {"loss_recon": float(recon.detach())}
        if self.cycle:
            logs["loss_cycle"] = float(cycle.detach())
        return AlignerOutput(hidden=t, losses={"loss_bga": self.alpha * (recon + cycle)}, logs=logs)
