"""The toy style classifier: a small CNN that names the style of a 32×32 picture.

Trained on generations of the toy zoo's models. Its top-1 gives style accuracy, and its penultimate
layer is the toy feature space for FID.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..files.atomic import atomic_folder
from ..files.text import read_json

FEATURES = 64


class StyleClassifier(nn.Module):
    def __init__(self, styles: list[str]):
        super().__init__()
        self.styles = list(styles)
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, FEATURES, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(FEATURES, len(self.styles))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Penultimate features of pictures given as floats in [0, 1], shape (B, 3, 32, 32)."""
        return self.body(pixels * 2 - 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))

    def save(self, folder: Path) -> None:
        with atomic_folder(folder) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp / "model.safetensors")
            config = {"styles": self.styles, "features": FEATURES}
            (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "StyleClassifier":
        config = read_json(folder / "config.json")
        model = cls(config["styles"])
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model.eval()


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB"), np.float32) / 255 for i in images])).permute(0, 3, 1, 2)


def train(
    classifier: StyleClassifier, pixels: torch.Tensor, labels: torch.Tensor, steps: int, seed: int, batch: int = 64
) -> StyleClassifier:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-4)
    classifier.train()
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (batch,), generator=gen)
        x = pixels[idx]
        flip = torch.rand(batch, generator=gen) < 0.5  # no style is left/right specific
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = nn.functional.cross_entropy(classifier(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return classifier.eval()


@torch.inference_mode()
def predict(classifier: StyleClassifier, pixels: torch.Tensor) -> torch.Tensor:
    """Class probabilities, shape (B, number of styles)."""
    return torch.cat([classifier(chunk).softmax(-1) for chunk in pixels.split(256)])
