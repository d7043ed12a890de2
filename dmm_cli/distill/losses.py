"""Distillation losses (paper Eq. 9-10): the score loss and the feature-imitation loss."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def score_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """‖student − teacher‖² of their predictions (ε, or v for a v-prediction base), averaged over elements."""
    return F.mse_loss(student.float(), teacher.float())


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], kind: str,
                 reduce: str = "mean") -> torch.Tensor:
    """The mean (or sum) over tapped blocks of MSE ("l2") or of 1 − the cosine similarity over channels at each
    pixel ("cos", as the released code computes it)."""
    losses = []
    for name, s in student.items():
        s, t = s.float(), teacher[name].float()
        if kind == "l2":
            losses.append(F.mse_loss(s, t))
        else:
            losses.append((1 - F.cosine_similarity(s, t, dim=1)).mean())
    stacked = torch.stack(losses)
    return stacked.sum() if reduce == "sum" else stacked.mean()
