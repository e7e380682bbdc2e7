"""The image backbones of `agch-data extract`: AlexNet, VGG-16 and VGG-19, cut at fc7.

The layers, their order and parameter names are torchvision's (torchvision.models.alexnet / vgg16 / vgg19), so
torchvision's ImageNet weight files load unchanged (`load_state_dict(strict=True)`). They are defined here rather
than imported because the torchvision wheels a CPU-only machine can install do not match the CPU torch build
(docs/data-format.md, "Raw images"); the architectures are fixed and small to state.

fc7 is the output of the second 4096-unit Linear layer after its ReLU, in eval mode (dropout off):
AlexNet `classifier[:6]` (Dropout, Linear, ReLU, Dropout, Linear, ReLU), VGG `classifier[:5]`
(Linear, ReLU, Dropout, Linear, ReLU).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from agch.errors import UserError, unknown
from agch.data.extract_options import BACKBONES, WEIGHT_FILES
from agch.data.importers import file_sha256

FC7_DIM = 4096
_VGG_LAYERS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
_FC7_END = {"alexnet": 6, "vgg16": 5, "vgg19": 5}


class Backbone(nn.Module):
    """features -> adaptive average pool -> classifier, as torchvision lays them out; forward returns fc7."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        if name == "alexnet":
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2))
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(
                nn.Dropout(0.5), nn.Linear(256 * 6 * 6, FC7_DIM), nn.ReLU(inplace=True),
                nn.Dropout(0.5), nn.Linear(FC7_DIM, FC7_DIM), nn.ReLU(inplace=True), nn.Linear(FC7_DIM, 1000))
        else:
            layers: list[nn.Module] = []
            channels = 3
            for width in _VGG_LAYERS[name]:
                if width == "M":
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    layers += [nn.Conv2d(channels, int(width), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                    channels = int(width)
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, FC7_DIM), nn.ReLU(True), nn.Dropout(0.5),
                nn.Linear(FC7_DIM, FC7_DIM), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(FC7_DIM, 1000))
            for module in self.modules():  # torchvision's VGG initialisation
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(module.bias)
                elif isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, 0, 0.01)
                    nn.init.zeros_(module.bias)
        self.fc7_end = _FC7_END[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) normalised images -> (B, 4096) fc7 activations (after ReLU)."""
        return self.classifier[:self.fc7_end](torch.flatten(self.avgpool(self.features(x)), 1))


def build_backbone(name: str, *, weights: Path | None = None, seed: int = 0) -> Backbone:
    """The backbone `name` in eval mode: `weights` loaded (a torchvision state dict), or random with `seed`."""
    if name not in BACKBONES:
        raise unknown("backbone", name, BACKBONES)
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Backbone(name).eval()
    state = _read_state_dict(weights)
    with torch.device("meta"):
        model = Backbone(name)
    _check_architecture(weights, name, state)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def cached_weights(name: str) -> Path | None:
    """torchvision's cached ImageNet weights file for `name` (under torch.hub.get_dir()), if it is there."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHT_FILES[name]
    return path if path.is_file() else None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise UserError(f"weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"weights {path}: not a readable torch state dict ({type(err).__name__}: {first_line}); "
                        f"expected torchvision's ImageNet weights file (e.g. {WEIGHT_FILES['alexnet']})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights {path}: holds a {type(state).__name__}, not a state dict (parameter name -> "
                        "tensor); expected torchvision's ImageNet weights file")
    return state


def _shapes(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in Backbone(name).state_dict().items()}


def _check_architecture(path: Path, name: str, state: dict[str, torch.Tensor]) -> None:
    """Refuse a state dict of another architecture, naming the one it is for when it is one of ours."""
    found = {key: tuple(value.shape) for key, value in state.items()}
    expected = _shapes(name)
    if found == expected:
        return
    other = next((o for o in BACKBONES if o != name and _shapes(o) == found), None)
    if other:
        raise UserError(f"weights {path}: these are {other} weights; expected {name} weights "
                        f"(use --backbone {other}, or {name}'s file, e.g. {WEIGHT_FILES[name]})")
    missing = [k for k in expected if k not in found]
    wrong = [k for k in expected if k in found and found[k] != expected[k]]
    detail = (f"missing {missing[0]} ({len(missing)} missing)" if missing else
              f"{wrong[0]} has shape {list(found[wrong[0]])}, expected {list(expected[wrong[0]])}" if wrong else
              f"unexpected {sorted(set(found) - set(expected))[0]}")
    raise UserError(f"weights {path}: not {name} weights in torchvision's layout ({len(found)} tensors; {detail}); "
                    f"expected {len(expected)} tensors from features.0.weight {list(expected['features.0.weight'])} "
                    f"to classifier.6.bias")


def describe_weights(path: Path | None, seed: int) -> str:
    """How the weights are named in provenance: the file's name and sha256, or 'random (seed N)'."""
    return f"random (seed {seed})" if path is None else f"{os.path.basename(path)} sha256 {file_sha256(path)}"
