"""ViT-S/16 (Dosovitskiy et al., ICLR 2021; "small" width from DeiT): dim 384, depth 12, 6 heads,
pre-norm blocks — with a mean-pooled-token head and NO class token, so that ``features`` (the final
normed patch tokens laid back on their 14 x 14 grid at 224 px) feed the same exact GAP -> linear
CAM head as the CNNs. ``img_size`` sets the learned position-embedding grid; other input sizes
(multiples of 16) interpolate it bicubically.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CamNet, DropPath
from .registry import ModelConfig, register_model


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(CamNet):
    def __init__(self, num_classes: int = 14, in_chans: int = 1, img_size: int = 224, patch_size: int = 16,
                 dim: int = 384, depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0,
                 drop_rate: float = 0.2, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.drop_rate = drop_rate
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, drop_path_rate * i / max(1, depth - 1))
                                      for i in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.num_features = dim
        self.classifier = nn.Linear(dim, num_classes)
        self._init()

    def _init(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        w = self.patch_embed.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=(1.0 / w[0].numel()) ** 0.5)  # LeCun-normal
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.classifier.weight)  # common ViT practice: start from a zero head
        nn.init.zeros_(self.classifier.bias)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        pe = self.pos_embed.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(h, w), mode="bicubic", align_corners=False)
        return pe.flatten(2).transpose(1, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # N x D x h x w
        n, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2) + self._pos_embed(h, w)
        tokens = self.norm(self.blocks(tokens))
        return tokens.transpose(1, 2).reshape(n, d, h, w)


@register_model(ModelConfig("vit_small_patch16", "teacher", 224, 384,
                            "ViT-S/16 (dim 384, depth 12, 6 heads), no CLS token, mean-pooled tokens",
                            "Dosovitskiy et al., An Image is Worth 16x16 Words, ICLR 2021 (arXiv:2010.11929); "
                            "Touvron et al., DeiT, ICML 2021"))
def vit_small_patch16(num_classes: int = 14, in_chans: int = 1, **kw) -> VisionTransformer:
    return VisionTransformer(num_classes, in_chans, **kw)
