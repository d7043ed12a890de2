"""ε, v and x₀ predictions turned into one another, exactly (with α = √ᾱ_t and σ = √(1−ᾱ_t), α² + σ² = 1):

    x_t = α·x₀ + σ·ε        v = α·ε − σ·x₀
    x₀ = (x_t − σ·ε)/α = α·x_t − σ·v        ε = (x_t − α·x₀)/σ = σ·x_t + α·v

so a teacher that predicts one quantity can teach a student that predicts another.
"""
from __future__ import annotations

import torch


def _scales(alpha_bar: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = alpha_bar.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return a.sqrt(), (1 - a).sqrt()


def x0_and_eps(output: torch.Tensor, kind: str, xt: torch.Tensor, alpha_bar: torch.Tensor):
    """(x̂₀, ε̂) from a model's `output` of prediction type `kind` at the noisy latents `xt`."""
    alpha, sigma = _scales(alpha_bar, output)
    if kind == "epsilon":
        return (xt - sigma * output) / alpha, output
    if kind == "v_prediction":
        return alpha * xt - sigma * output, sigma * xt + alpha * output
    return output, (xt - alpha * output) / sigma  # "sample"


def convert(output: torch.Tensor, kind: str, to: str, xt: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """`output`, a prediction of type `kind`, as a prediction of type `to`."""
    if kind == to:
        return output
    alpha, sigma = _scales(alpha_bar, output)
    if kind == "v_prediction" and to == "epsilon":  # the common case, without a division
        return sigma * xt + alpha * output
    x0, eps = x0_and_eps(output, kind, xt, alpha_bar)
    return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[to]
