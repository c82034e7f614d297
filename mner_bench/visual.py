"""Visual encoders: open_clip's CLIP ViT-B/32 and torchvision's ResNet-152.

Both turn preprocessed images ``[B, 3, S, S]`` (normalised with the encoder's own ``mean`` and
``std``; :mod:`mner_bench.images` does that) into visual tokens ``[B, N_v, H_v]``:

* ``clip-vit-b32``: CLS + 7x7 patch tokens of width 768 (``[B, 50, 768]``), the last block's
  output passed through ``ln_post`` and *not* through CLIP's projection to the joint space
  (that projection is dropped, so it is not counted in the parameters). ``embed`` and
  ``blocks`` let a caller (the BGA plugin) run the transformer one block at a time.
* ``resnet152``: the last stage's feature map pooled to a 7x7 grid of 2048-d regions
  (``[B, 49, 2048]``), as UMT used it.

Weights are never downloaded. ``clip-vit-b32`` loads an open_clip pretrained tag only when its
checkpoint is already in the local caches (Hugging Face hub cache or ``~/.cache/clip``), or a
checkpoint file given as ``pretrained``; ``resnet152`` loads a torchvision weights name only
when its file is in the torch hub cache, or a state-dict file given as ``weights``. Otherwise
the encoder keeps random weights, logs a loud warning and sets ``random_init = True`` (the run
then carries the MLflow tag ``visual_weights=random``); ``require_pretrained=true`` turns that
into a :class:`~mner_bench.errors.ConfigError` instead.

With ``freeze=true`` an encoder runs without gradients in eval mode and (``cache_features``,
default on) computes the output of each distinct image once per run, reusing it in later
epochs and at evaluation: a frozen encoder then costs one forward pass per image per run.

Each has a tiny configuration for tests (``tiny=true``: width 32, 2 layers, 32-pixel images for
the ViT; a one-block-per-stage ResNet with BasicBlocks and 32-pixel images for the ResNet).

Full-size parameter counts (projection and classifier dropped), as counted by
``tests/test_visual.py::test_full_size_parameter_counts_and_shapes`` (slow): ViT-B/32 87,456,000
(87,849,216 with the dropped projection), ResNet-152 58,143,808 (:data:`FULL_SIZE_PARAMS`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError
from .model import VisualEncoder

log = logging.getLogger(__name__)

#: parameters of the full-size encoders as built here (measured, see the module docstring)
FULL_SIZE_PARAMS = {"clip-vit-b32": 87_456_000, "resnet152": 58_143_808}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _random_weights_warning(name: str, why: str) -> None:
    log.warning(
        "VISUAL ENCODER %s HAS RANDOM WEIGHTS: %s. Scores of this run say nothing about the "
        "pretrained encoder; the run is tagged visual_weights=random.", name, why,
    )


class _FrozenMixin:
    """Shared freezing: no gradients, eval mode kept (BatchNorm statistics stay fixed), the
    forward pass runs without building a graph, and (``cache_features``) the output of each
    distinct image is computed once per run and then reused.

    The feature memo is keyed by a 128-bit BLAKE2 hash of the image tensor's bytes (so it needs
    no IMGIDs and can never mix up two different images); it holds at most
    ``feature_cache_mb`` megabytes of outputs (later images are computed every time).
    """

    frozen: bool = False
    cache_features: bool = False
    feature_cache_mb: int = 0

    def _freeze(self, cache_features: bool = False, feature_cache_mb: int = 0) -> None:
        self.frozen = True
        self.cache_features = cache_features
        self.feature_cache_mb = feature_cache_mb
        self._features: dict[bytes, torch.Tensor] = {}
        self._feature_bytes = 0
        self.feature_hits = self.feature_misses = 0
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def _memoised(self, images: torch.Tensor, compute) -> torch.Tensor:
        """``compute(images)``, reusing the stored output of images seen before (frozen only)."""
        if not (self.frozen and self.cache_features):
            return compute(images)
        host = images.detach().to("cpu", torch.float32).contiguous().numpy()
        kind = images.device.type
        # outputs differ under autocast (bf16) and without it: never serve one for the other
        salt = f"{torch.is_autocast_enabled(kind)}:{torch.get_autocast_dtype(kind)}".encode()
        keys = [hashlib.blake2b(salt + row.tobytes(), digest_size=16).digest() for row in host]
        todo = [i for i, k in enumerate(keys) if k not in self._features]
        fresh: dict[bytes, torch.Tensor] = {}
        if todo:
            out = compute(images[todo])
            for j, i in enumerate(todo):
                fresh[keys[i]] = out[j]
                if self._feature_bytes < self.feature_cache_mb * 2**20:
                    self._features[keys[i]] = out[j]
                    self._feature_bytes += out[j].numel() * out[j].element_size()
        self.feature_misses += len(todo)
        self.feature_hits += len(keys) - len(todo)
        rows = [fresh[k] if k in fresh else self._features[k] for k in keys]
        dtype = rows[0].dtype
        return torch.stack([r.to(dtype) for r in rows])


# --------------------------------------------------------------------------- CLIP ViT-B/32


@dataclass
class ClipVitConfig:
    type: str = "clip-vit-b32"
    #: an open_clip pretrained tag of ViT-B-32 (``openai``, ``laion2b_s34b_b79k``, ...), used
    #: only when its checkpoint is in the local cache; or a local open_clip checkpoint file;
    #: None: random weights
    pretrained: str | None = "openai"
    #: fail (ConfigError) instead of falling back to random weights
    require_pretrained: bool = False
    #: no gradients for the encoder (kept in eval mode)
    freeze: bool = False
    #: with freeze: compute each distinct image's tokens once per run and reuse them
    cache_features: bool = True
    #: most memory (MB) the reused tokens may take (about 0.15 MB per image at full size)
    feature_cache_mb: int = 2048
    #: QuickGELU activations; None: as the pretrained tag was trained (openai: True), else False
    quick_gelu: bool | None = None
    #: tiny random architecture for tests (width 32, 2 layers, 2 heads, patch 8, image 32)
    tiny: bool = False
    #: architecture overrides (None: ViT-B/32's, or the tiny one's); any override means random weights
    image_size: int | None = None
    patch_size: int | None = None
    width: int | None = None
    layers: int | None = None
    heads: int | None = None


_VIT_B32 = {"image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "heads": 12}
_VIT_TINY = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}


def _cached_clip_checkpoint(tag: str) -> str | None:
    """The local file of open_clip's ViT-B-32 checkpoint ``tag``, or None when it is not cached.

    Looks where open_clip itself would download to (the Hugging Face hub cache first, then
    ``~/.cache/clip`` for URL downloads); never touches the network.
    """
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    pcfg = open_clip.get_pretrained_cfg("ViT-B-32", tag)
    hub = pcfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        for name in names:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = pcfg.get("url", "")
    if url:
        path = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if path.is_file():
            return str(path)
    return None


class ClipVitEncoder(_FrozenMixin, VisualEncoder):
    """open_clip's ViT-B/32 visual tower: ``[B, 3, 224, 224] -> [B, 50, 768]`` tokens.

    ``embed(images)`` gives the tokens that enter the first block ``[B, 50, 768]`` (patch
    embedding, CLS token, positional embedding, ``ln_pre``); ``blocks`` is the
    ``nn.ModuleList`` of the 12 residual attention blocks, each batch-first:
    ``block(x [B, N, W]) -> [B, N, W]``; ``final_norm`` is ``ln_post``. So
    ``forward(x) == final_norm(blocks[11](...blocks[0](embed(x))))``.
    """

    def __init__(self, cfg: ClipVitConfig):
        super().__init__()
        import open_clip

        overrides = {k: getattr(cfg, k) for k in _VIT_B32 if getattr(cfg, k) is not None}
        arch = {**(_VIT_TINY if cfg.tiny else _VIT_B32), **overrides}
        if arch["image_size"] % arch["patch_size"]:
            raise ConfigError(
                f"visual_encoder.image_size={arch['image_size']} is not a multiple of "
                f"visual_encoder.patch_size={arch['patch_size']}"
            )
        if arch["width"] % arch["heads"]:
            raise ConfigError(f"visual_encoder.width={arch['width']} is not a multiple of visual_encoder.heads={arch['heads']}")
        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        self.random_init = True
        tower = None
        why = "visual_encoder.pretrained is null"
        if cfg.tiny or overrides:
            why = "a tiny or resized architecture (visual_encoder.tiny / size overrides) has no pretrained weights"
        elif cfg.pretrained:
            tower, mean, std, why = self._load_pretrained(cfg)
        if tower is None:
            if cfg.require_pretrained:
                raise ConfigError(f"visual_encoder.pretrained: no pretrained weights loaded ({why}) "
                                  f"and visual_encoder.require_pretrained=true")
            _random_weights_warning("clip-vit-b32", why)
            from open_clip.transformer import QuickGELU, VisionTransformer

            tower = VisionTransformer(
                image_size=arch["image_size"], patch_size=arch["patch_size"], width=arch["width"],
                layers=arch["layers"], heads=arch["heads"], mlp_ratio=4.0, output_dim=arch["width"],
                act_layer=QuickGELU if cfg.quick_gelu else nn.GELU,
            )
        else:
            self.random_init = False
        tower.proj = None  # CLIP's projection to the joint space is not used
        if not tower.transformer.batch_first:  # pragma: no cover - open_clip >= 2.24 is batch-first
            raise ConfigError("this open_clip version builds sequence-first blocks; mner-bench needs batch-first ones")
        self.tower = tower
        self.hidden_size = tower.transformer.width
        self.image_size = tower.image_size[0]
        self.num_tokens = tower.grid_size[0] * tower.grid_size[1] + 1
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if cfg.freeze:
            self._freeze(cfg.cache_features, cfg.feature_cache_mb)

    @staticmethod
    def _load_pretrained(cfg: ClipVitConfig):
        """(tower, mean, std, None) with the pretrained weights, or (None, ..., why) when they
        are not available locally."""
        import open_clip

        tag_cfg = open_clip.get_pretrained_cfg("ViT-B-32", cfg.pretrained)
        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        if tag_cfg:
            path = _cached_clip_checkpoint(cfg.pretrained)
            if path is None:
                return None, mean, std, (f"open_clip tag '{cfg.pretrained}' is not in the local cache "
                                         f"(nothing is downloaded)")
            quick = tag_cfg.get("quick_gelu", False) if cfg.quick_gelu is None else cfg.quick_gelu
            mean, std = tag_cfg.get("mean", mean), tag_cfg.get("std", std)
        elif Path(cfg.pretrained).expanduser().is_file():
            path = str(Path(cfg.pretrained).expanduser())
            quick = bool(cfg.quick_gelu)
        else:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model("ViT-B-32"))
            raise ConfigError(f"visual_encoder.pretrained='{cfg.pretrained}' is neither an open_clip tag of "
                              f"ViT-B-32 ({tags}) nor an existing checkpoint file")
        try:
            model = open_clip.create_model("ViT-B-32", pretrained=path, force_quick_gelu=quick, device="cpu")
        except Exception as exc:
            raise ConfigError(f"visual_encoder.pretrained: cannot load the open_clip checkpoint {path}: {exc}") from None
        log.info("clip-vit-b32: pretrained weights from %s", path)
        return model.visual, mean, std, None

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (batch-first ``[B, N, W] -> [B, N, W]``)."""
        return self.tower.transformer.resblocks

    @property
    def final_norm(self) -> nn.Module:
        """``ln_post``, applied to every token after the last block."""
        return self.tower.ln_post

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S] -> [B, 1 + (S/P)^2, W]``: patch embedding, CLS token, positional
        embedding and ``ln_pre`` (the input of ``blocks[0]``)."""
        t = self.tower
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = t.conv1(images)  # [B, W, g, g]
            x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
            cls = t.class_embedding.to(x.dtype).expand(x.size(0), 1, -1)
            x = torch.cat([cls, x], dim=1) + t.positional_embedding.to(x.dtype)
            x = t.patch_dropout(x)
            return t.ln_pre(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S] -> [B, 50, 768]``: all tokens after the last block and ``ln_post``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self._memoised(images, self._tokens)

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)


# --------------------------------------------------------------------------- ResNet-152


@dataclass
class ResNetConfig:
    type: str = "resnet152"
    #: torchvision weights name of ResNet-152 (``IMAGENET1K_V1``, ``IMAGENET1K_V2``, ``DEFAULT``),
    #: used only when its file is in the torch hub cache; or a local state-dict file; None: random
    weights: str | None = "IMAGENET1K_V1"
    #: fail (ConfigError) instead of falling back to random weights
    require_pretrained: bool = False
    #: no gradients for the encoder (kept in eval mode, BatchNorm statistics fixed)
    freeze: bool = False
    #: with freeze: compute each distinct image's regions once per run and reuse them
    cache_features: bool = True
    #: most memory (MB) the reused regions may take (about 0.4 MB per image at full size)
    feature_cache_mb: int = 2048
    #: regions per side: the last stage is average-pooled to grid x grid regions
    grid: int = 7
    #: tiny random architecture for tests (BasicBlocks, one per stage, width 512, image 32)
    tiny: bool = False
    #: input size (None: 224, or 32 when tiny)
    image_size: int | None = None


class ResNetEncoder(_FrozenMixin, VisualEncoder):
    """torchvision's ResNet-152 without its classifier: ``[B, 3, 224, 224] -> [B, 49, 2048]``.

    The last stage's map ``[B, 2048, h, w]`` (7x7 at 224 pixels) is average-pooled to
    ``grid x grid`` and flattened row by row into regions.
    """

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        from torchvision.models import resnet152
        from torchvision.models.resnet import BasicBlock, ResNet

        if cfg.grid < 1:
            raise ConfigError(f"visual_encoder.grid must be at least 1, got {cfg.grid}")
        if cfg.tiny:
            net = ResNet(BasicBlock, [1, 1, 1, 1])
            state, why = None, "a tiny architecture (visual_encoder.tiny) has no pretrained weights"
        else:
            net = resnet152(weights=None)
            state, why = self._pretrained_state(cfg)
        self.random_init = state is None
        if state is None:
            if cfg.require_pretrained:
                raise ConfigError(f"visual_encoder.weights: no pretrained weights loaded ({why}) "
                                  f"and visual_encoder.require_pretrained=true")
            _random_weights_warning("resnet152", why)
        else:
            try:
                net.load_state_dict(state)
            except RuntimeError as exc:
                raise ConfigError(f"visual_encoder.weights: not a ResNet-152 state dict ({exc})") from None
        self.hidden_size = net.fc.in_features
        net.fc = nn.Identity()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)
        self.grid = cfg.grid
        self.image_size = cfg.image_size or (32 if cfg.tiny else 224)
        self.num_tokens = cfg.grid * cfg.grid
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        if cfg.freeze:
            self._freeze(cfg.cache_features, cfg.feature_cache_mb)

    @staticmethod
    def _pretrained_state(cfg: ResNetConfig):
        """(state_dict, None), or (None, why) when the weights are not available locally."""
        if not cfg.weights:
            return None, "visual_encoder.weights is null"
        path = Path(cfg.weights).expanduser()
        if path.is_file():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ConfigError(f"visual_encoder.weights: cannot read {path}: {exc}") from None
            return state.get("state_dict", state), None
        from torchvision.models import get_weight

        try:
            weights = get_weight(f"ResNet152_Weights.{cfg.weights}")
        except (ValueError, KeyError):
            raise ConfigError(f"visual_encoder.weights='{cfg.weights}' is neither a ResNet152_Weights name "
                              f"(IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT) nor an existing file") from None
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if not cached.is_file():
            return None, f"torchvision weights {weights} are not in the torch hub cache ({cached}; nothing is downloaded)"
        log.info("resnet152: pretrained weights from %s", cached)
        return torch.load(cached, map_location="cpu", weights_only=True), None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S] -> [B, grid*grid, 2048]`` region features."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self._memoised(images, self._regions)

    def _regions(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(images))  # [B, C, h, w]
        x = F.adaptive_avg_pool2d(x, self.grid)  # [B, C, grid, grid]
        return x.flatten(2).transpose(1, 2)  # [B, grid*grid, C]
