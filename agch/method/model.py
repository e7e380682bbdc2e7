"""AGCH's networks (Sec. III-B, IV-C) in feature mode: encoders, fusion and the two GCN modules.

Image input is a precomputed CNN feature (fc7, 4096-d); the trainable image encoder is what sits above it.
At test time only the encoders produce codes (Eq. 17); fusion and GCN are training-time helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from agch.config import Config
from agch.errors import UserError
from agch.method.similarity import normalized_adjacency


class FeatureNorm(nn.Module):
    """x ↦ (x − shift) / scale per feature, with the training split's statistics (config.feature_norm).

    The statistics are buffers, so a checkpoint carries them and test-time encoding applies the same map.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, mode: str) -> None:
        """Set the statistics from the training rows x (n, dim): 'none', 'center' or 'standardize'."""
        if mode in ("center", "standardize"):
            self.shift.copy_(x.mean(dim=0))
        if mode == "standardize":
            self.scale.copy_(x.std(dim=0).clamp_min(1e-6))  # a constant feature stays centred, not blown up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


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
    """`gcn_layers` graph convolutions (the paper: two) + one FC: f → gcn_hidden → … → c, ReLU then tanh."""

    def __init__(self, in_dim: int, config: Config):
        super().__init__()
        widths = [in_dim] + [config.gcn_hidden] * config.gcn_layers
        self.layers = nn.ModuleList(GraphConvolution(a, b) for a, b in zip(widths, widths[1:]))
        self.code = nn.Linear(config.gcn_hidden, config.bits)

    def forward(self, f: torch.Tensor, adj_norm: torch.Tensor) -> torch.Tensor:
        h = f
        for layer in self.layers:
            h = torch.relu(layer(h, adj_norm))  # (m, gcn_hidden)
        return torch.tanh(self.code(h))  # (m, c)


ENCODER_MODULES = ("norm", "image", "text")
"""The submodules test-time encoding uses (Eq. 17); fusion and the GCNs are training-time helpers."""


@dataclass
class Codes:
    """The five relaxed code matrices of one batch, each (m, c), before L2 normalisation; h is None without the
    fusion module (config.no_fusion), gv and gt without the GCN modules (config.no_gcn)."""

    v: torch.Tensor
    t: torch.Tensor
    h: torch.Tensor | None
    gv: torch.Tensor | None
    gt: torch.Tensor | None


class AGCH(nn.Module):
    """The full training-time model. `forward` takes features already through `norm`; `encode` is the test-time
    hash function and takes raw features."""

    def __init__(self, image_dim: int, text_dim: int, config: Config):
        super().__init__()
        self.norm = nn.ModuleDict({"image": FeatureNorm(image_dim), "text": FeatureNorm(text_dim)})
        self.image = ImageEncoder(image_dim, config)
        self.text = TextEncoder(text_dim, config)
        # the paper's component ablation: without them the modules do not exist (no parameters, no output)
        self.fusion = (None if config.no_fusion
                       else nn.Linear(self.image.feature_dim + self.text.feature_dim, config.bits))
        self.gcn_image = None if config.no_gcn else GCNModule(self.image.feature_dim, config)
        self.gcn_text = None if config.no_gcn else GCNModule(self.text.feature_dim, config)

    def forward(self, zv: torch.Tensor, zt: torch.Tensor, adjacency: torch.Tensor) -> Codes:
        fv, bv = self.image(zv)
        ft, bt = self.text(zt)
        codes = Codes(v=bv, t=bt, h=None, gv=None, gt=None)
        if self.fusion is not None:
            codes.h = torch.tanh(self.fusion(torch.cat([fv, ft], dim=1)))  # o^h = concat(f^v, f^t) → FC → tanh
        if self.gcn_image is not None:
            adj_norm = normalized_adjacency(adjacency)
            codes.gv, codes.gt = self.gcn_image(fv, adj_norm), self.gcn_text(ft, adj_norm)
        return codes

    def parameter_groups(self, config: Config) -> list[dict]:
        """Optimizer groups with the per-module learning rates (the paper's by default), for the modules present."""
        groups = [(config.lr_image, [self.image]), (config.lr_text, [self.text]),
                  (config.lr_gcn, [self.gcn_image, self.gcn_text]), (config.lr_fusion, [self.fusion])]
        return [{"params": [p for m in modules for p in m.parameters()], "lr": lr}
                for lr, modules in groups if modules[0] is not None]

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The weights and buffers `encode` uses (ENCODER_MODULES), copied to the CPU: the test-time hash functions."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()
                if k.split(".")[0] in ENCODER_MODULES}

    def load_encoder_state(self, state: dict[str, torch.Tensor], where: str = "encoders") -> None:
        """Load what encoder_state saved; a UserError when it does not fit this model (other sizes or settings)."""
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as err:  # a shape mismatch
            raise UserError(f"{where} does not fit this model: {str(err).splitlines()[-1].strip()}") from None
        missing = [k for k in missing if k.split(".")[0] in ENCODER_MODULES]
        if missing or unexpected:
            raise UserError(f"{where} does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}")

    @torch.no_grad()
    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Sign codes in {−1, +1} (int8) of one modality's raw features (Eq. 17). sign(0) is mapped to +1."""
        _, b = (self.image if modality == "image" else self.text)(self.norm[modality](x))
        return torch.where(b >= 0, 1, -1).to(torch.int8)
