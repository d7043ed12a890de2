"""Distillation losses (paper Eq. 9-10): the score loss and the feature-imitation loss."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def score_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """‖student − teacher‖² of their predictions (ε, or v for a v-prediction base), averaged over elements."""
    return F.mse_loss(student.float(), teacher.float())


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Mean over tapped blocks of MSE ("l2") or 1 − cosine similarity per sample ("cos")."""
    losses = []
    for name, s in student.items():
        s, t = s.float(), teacher[name].float()
        if kind == "l2":
            losses.append(F.mse_loss(s, t))
        else:
            losses.append((1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean())
    return torch.stack(losses).mean()
