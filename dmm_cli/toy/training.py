"""Train a toy denoiser the way Stable Diffusion is trained: shared by the zoo's base, its teachers and its LoRAs."""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch.nn import functional as F
from tqdm.auto import tqdm

from .. import console
from . import components


def progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, disable=console.progress_disabled(), leave=False)


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
