"""The trained part of a bound model: one projector per modality, and the layers each reads.

It maps cached encoder features (one tensor per layer) to the shared space. The trainer
optimises it; `BoundModel` (align/bound.py) wraps it with the blend and the retrieval correction.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .. import saving
from ..errors import AnybindError
from .projectors import Projector

KIND = "projector-space"


class ProjectorSpace(nn.Module):
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
        """A saved part (kind projector-space) with one projector folder per modality."""
        directory = Path(directory)
        for name, proj in self.projectors.items():
            proj.save(directory / name)
        return saving.save_part(directory, KIND, "projectors", modalities=self.modalities, layers=self.layers)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ProjectorSpace:
        directory = Path(directory)
        info = saving.read_config(directory, KIND)
        return cls({m: Projector.load(directory / m) for m in info["modalities"]}, info["layers"])
