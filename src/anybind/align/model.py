"""A bound model at the feature level: one projector per modality into the shared space.

It maps cached encoder features (one tensor per layer it reads) to L2-normalised embeddings. The
ship issue wraps it with the encoders into a bundle; evaluation uses it directly on stores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import AnybindError
from .projectors import Projector


class BoundModel(nn.Module):
    """Projectors per modality, plus the layers each reads."""

    def __init__(self, projectors: dict[str, Projector], layers: dict[str, list[str]]):
        super().__init__()
        self.projectors = nn.ModuleDict(projectors)
        self.layers = {k: list(v) for k, v in layers.items()}

    @property
    def modalities(self) -> list[str]:
        return list(self.projectors)

    def project(self, modality: str, feats: list[torch.Tensor]) -> torch.Tensor:
        """Raw projector output (not normalised): what the losses take."""
        proj = self.projectors[modality]
        return proj(feats if len(feats) > 1 else feats[0])

    @torch.no_grad()
    def encode(self, modality: str, feats: list[torch.Tensor] | torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """Normalised shared-space embeddings of features, in batches."""
        if modality not in self.projectors:
            raise AnybindError(f"this model binds {', '.join(self.modalities)}, not '{modality}'")
        if isinstance(feats, torch.Tensor):
            feats = [feats]
        # features may sit on the CPU (stores) while the projectors sit on a GPU: compute where the
        # projector is, hand back where the features came from
        device = next(self.projectors[modality].parameters(), torch.empty(0)).device
        was_training = self.training
        self.eval()
        out = []
        for lo in range(0, len(feats[0]), batch_size):
            z = self.project(modality, [f[lo : lo + batch_size].to(device).float() for f in feats])
            out.append(torch.nn.functional.normalize(z.float(), dim=-1).to(feats[0].device))
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, 0)

    def save(self, directory: str | os.PathLike) -> Path:
        """A folder: bound.json (modalities, layers) and one projector folder per modality."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, proj in self.projectors.items():
            proj.save(directory / name)
        (directory / "bound.json").write_text(json.dumps({"format": 1, "modalities": self.modalities,
                                                          "layers": self.layers}, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> BoundModel:
        directory = Path(directory)
        try:
            info = json.loads((directory / "bound.json").read_text())
        except (OSError, ValueError) as e:
            raise AnybindError(f"{directory} is not a saved bound model (bound.json unreadable: {e})") from e
        return cls({m: Projector.load(directory / m) for m in info["modalities"]}, info["layers"])
