"""AGCH's networks (Sec. III-B, IV-C) in feature mode: encoders, fusion and the two GCN modules.

Image input is a precomputed CNN feature (fc7, 4096-d); the trainable image encoder is what sits above it.
At test time only the encoders produce codes (Eq. 17); fusion and GCN are training-time helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from agch.config import Config
from agch.similarity import normalized_adjacency


class ImageEncoder(nn.Module):
    """fc7 features → (optional hidden layer) → c, tanh. f^v is the input (or the hidden layer when present)."""

    def __init__(self, in_dim: int, config: Config):
        super().__init__()
        self.hidden = (nn.Sequential(nn.Linear(in_dim, config.image_hidden), nn.ReLU())
                       if config.image_hidden else nn.Identity())
        self.feature_dim = config.image_hidden or in_dim
        self.code = nn.Linear(self.feature_dim, config.bits)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.hidden(x)  # (m, feature_dim)
        return f, torch.tanh(self.code(f))  # (m, c)


class TextEncoder(nn.Module):
    """Bag-of-words K → text_hidden → c; ReLU inside, tanh on the code. With fix `text_input`: BatchNorm1d on the
    sparse input, LeakyReLU, and gain-2.0 init of the first layer (the log's remedy for near-zero text codes)."""

    def __init__(self, in_dim: int, config: Config):
        super().__init__()
        fix = config.fixes.text_input
        self.input_norm = nn.BatchNorm1d(in_dim) if fix else nn.Identity()
        self.hidden = nn.Linear(in_dim, config.text_hidden)
        self.act = nn.LeakyReLU(0.2) if fix else nn.ReLU()
        self.code = nn.Linear(config.text_hidden, config.bits)
        self.feature_dim = config.text_hidden
        if fix:
            nn.init.kaiming_normal_(self.hidden.weight, a=0.2, nonlinearity="leaky_relu")
            self.hidden.weight.data.mul_(2.0)  # the log's first-layer gain 2.0 on top of Kaiming scaling
            nn.init.zeros_(self.hidden.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.act(self.hidden(self.input_norm(x)))  # (m, text_hidden)
        return f, torch.tanh(self.code(f))  # (m, c)


class GraphConvolution(nn.Module):
    """H' = Â H W with Â = D̃^-1/2 Ã D̃^-1/2 (Eq. 6); the caller applies σ."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, h: torch.Tensor, adj_norm: torch.Tensor) -> torch.Tensor:
        return adj_norm @ self.linear(h)  # (m, m) @ (m, out)


class GCNModule(nn.Module):
    """Two graph convolutions + one FC: f → gcn_hidden → gcn_hidden → c, ReLU then tanh on the code."""

    def __init__(self, in_dim: int, config: Config):
        super().__init__()
        self.gc1 = GraphConvolution(in_dim, config.gcn_hidden)
        self.gc2 = GraphConvolution(config.gcn_hidden, config.gcn_hidden)
        self.code = nn.Linear(config.gcn_hidden, config.bits)

    def forward(self, f: torch.Tensor, adj_norm: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.gc1(f, adj_norm))
        h = torch.relu(self.gc2(h, adj_norm))
        return torch.tanh(self.code(h))  # (m, c)


@dataclass
class Codes:
    """The five relaxed code matrices of one batch, each (m, c), before L2 normalisation."""

    v: torch.Tensor
    t: torch.Tensor
    h: torch.Tensor
    gv: torch.Tensor
    gt: torch.Tensor


class AGCH(nn.Module):
    """The full training-time model. `encode_image`/`encode_text` are the test-time hash functions."""

    def __init__(self, image_dim: int, text_dim: int, config: Config):
        super().__init__()
        self.image = ImageEncoder(image_dim, config)
        self.text = TextEncoder(text_dim, config)
        self.fusion = nn.Linear(self.image.feature_dim + self.text.feature_dim, config.bits)
        self.gcn_image = GCNModule(self.image.feature_dim, config)
        self.gcn_text = GCNModule(self.text.feature_dim, config)

    def forward(self, zv: torch.Tensor, zt: torch.Tensor, adjacency: torch.Tensor) -> Codes:
        fv, bv = self.image(zv)
        ft, bt = self.text(zt)
        bh = torch.tanh(self.fusion(torch.cat([fv, ft], dim=1)))  # o^h = concat(f^v, f^t) → FC → tanh
        adj_norm = normalized_adjacency(adjacency)
        return Codes(v=bv, t=bt, h=bh, gv=self.gcn_image(fv, adj_norm), gt=self.gcn_text(ft, adj_norm))

    def parameter_groups(self, config: Config) -> list[dict]:
        """SGD groups with the paper's per-module learning rates."""
        return [
            {"params": self.image.parameters(), "lr": config.lr_image},
            {"params": self.text.parameters(), "lr": config.lr_text},
            {"params": list(self.gcn_image.parameters()) + list(self.gcn_text.parameters()), "lr": config.lr_gcn},
            {"params": self.fusion.parameters(), "lr": config.lr_fusion},
        ]

    @torch.no_grad()
    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Sign codes in {−1, +1} (int8) of one modality (Eq. 17). sign(0) is mapped to +1."""
        _, b = (self.image if modality == "image" else self.text)(x)
        return torch.where(b >= 0, 1, -1).to(torch.int8)
