"""Train a toy denoiser the way Stable Diffusion is trained, shared by the zoo's bases, teachers and LoRAs, with the
steps around it: a style's pictures as latents, and a trained model written into the zoo."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from torch.nn import functional as F
from tqdm.auto import tqdm

from .. import console
from ..files.atomic import atomic_folder
from . import components, shapes


def progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, disable=console.progress_disabled(), leave=False)


def style_latents(vae, style: str, plan, seed: int) -> tuple[torch.Tensor, list[str]]:
    """A style's training pictures as scaled latents of `vae`, and their captions."""
    from .classifier import to_pixels

    items = shapes.dataset(style, shapes.all_pairs(), plan.images_per_pair, seed)
    with torch.inference_mode():
        pixels = to_pixels([image for image, _ in items]) * 2 - 1
        latents = torch.cat([vae.encode(c).latent_dist.mode() for c in pixels.split(256)]) * vae.config.scaling_factor
    return latents.clone(), [c for _, c in items]  # a clone outside inference mode: autograd takes no inference tensors


def save_model(pipe, folder: Path, links: dict[str, str]) -> None:
    """Write one zoo model in fp16, its `links` parts replaced by relative links (part -> "model/part") to keep the
    zoo small."""
    with atomic_folder(folder) as tmp:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        pipe.to(torch.float32)
        for part, target in links.items():
            for f in (tmp / part).iterdir():
                f.unlink()
            (tmp / part).rmdir()
            os.symlink(Path("..") / target, tmp / part)


def text_conditioning(text_encoder, tokenizer, captions: list[str]):
    """SD1.x's conditioning of dataset items: the text encoder's last hidden states, the empty caption's if dropped."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids

    def condition(idx: torch.Tensor, drop: torch.Tensor) -> dict:
        return {"encoder_hidden_states": text_encoder(torch.where(drop[:, None], empty, ids[idx]))[0]}
    return condition


def train_denoiser(unet, condition, latents, steps, plan, seed, desc, text_params=()):
    """Plain epsilon-prediction diffusion training with caption dropout, as Stable Diffusion is trained.

    `condition(idx, drop)` gives the UNet's text keyword arguments for dataset items `idx`, captions dropped where
    `drop`; `text_params` (text-encoder weights) are trained along with the UNet."""
    torch.manual_seed(seed)
    noise_schedule = DDPMScheduler(**{k: v for k, v in components.SCHEDULER.items() if k in
                                      ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    text_params = list(text_params)
    for p in text_params:
        p.requires_grad_(True)
    params = list(unet.parameters()) + text_params
    opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=1e-4)
    lr_at = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * (1 - 0.9 * s / max(steps, 1)))
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    with progress(steps, desc) as bar:
        for _ in range(steps):
            idx = torch.randint(0, len(latents), (plan.batch,), generator=gen)
            x0 = latents[idx]
            drop = torch.rand(plan.batch, generator=gen) < plan.caption_dropout
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, noise_schedule.config.num_train_timesteps, (plan.batch,), generator=gen)
            xt = noise_schedule.add_noise(x0, noise, t)
            loss = F.mse_loss(unet(xt, t, **condition(idx, drop)).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            lr_at.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()
    unet.eval()
    for p in text_params:
        p.requires_grad_(False)
    return unet
