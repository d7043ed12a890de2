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


def train_denoiser(unet, text_encoder, tokenizer, latents, captions, steps, plan, seed, desc, train_text):
    """Plain epsilon-prediction diffusion training with caption dropout, as Stable Diffusion is trained."""
    torch.manual_seed(seed)
    noise_schedule = DDPMScheduler(**{k: v for k, v in components.SCHEDULER.items() if k in
                                      ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    text_encoder.requires_grad_(train_text)
    opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=1e-4)
    lr_at = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * (1 - 0.9 * s / max(steps, 1)))
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    with progress(steps, desc) as bar:
        for _ in range(steps):
            idx = torch.randint(0, len(latents), (plan.batch,), generator=gen)
            x0 = latents[idx]
            drop = torch.rand(plan.batch, generator=gen) < plan.caption_dropout
            batch_ids = torch.where(drop[:, None], empty, ids[idx])
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, noise_schedule.config.num_train_timesteps, (plan.batch,), generator=gen)
            xt = noise_schedule.add_noise(x0, noise, t)
            context = text_encoder(batch_ids)[0]
            loss = F.mse_loss(unet(xt, t, encoder_hidden_states=context).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            lr_at.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()
    unet.eval()
    text_encoder.requires_grad_(False)
    return unet
