"""One student, many frozen teachers: the distillation step, checkpoints and the training loop.

All randomness of step k (which samples, which teacher, caption drop, noise, timesteps) comes from
a generator seeded by (seed, k, micro-batch, rank), so a resumed run replays exactly what an
uninterrupted one would have done.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from .. import console
from ..checkpoint import atomic_file, atomic_folder, component_sha256
from ..pipeline import load_component
from ..recipe import Recipe
from ..student import FeatureTaps, make_student
from .data import LatentSet
from .losses import feature_loss, score_loss

TRAIN_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StepLosses:
    loss: torch.Tensor
    score: torch.Tensor
    feature: torch.Tensor


@dataclass
class Teacher:
    unet: UNet2DConditionModel
    text_encoder_key: str
    taps: FeatureTaps = field(repr=False, default=None)


def _seed_for(*parts: int) -> int:
    value = 0x9E3779B97F4A7C15
    for p in parts:
        value = (value * 6364136223846793005 + p + 1442695040888963407) % (1 << 63)
    return value


def load_text_encoders(folders: dict[str, Path], device, dtype) -> tuple[dict[str, str], dict[str, CLIPTextModel]]:
    """Text encoders by content hash: identical ones (the usual case for fine-tunes) are loaded once."""
    key_of, encoders = {}, {}
    for name, folder in folders.items():
        key = component_sha256(folder / "text_encoder")
        key_of[name] = key
        if key not in encoders:
            encoders[key] = load_component(CLIPTextModel, folder, "text_encoder", dtype).to(device).eval()
            encoders[key].requires_grad_(False)
    return key_of, encoders


class Trainer:
    """Holds the models and the optimizer; `step(k)` performs optimizer update k."""

    def __init__(self, recipe: Recipe, base: Path, teachers: list[Path], data: LatentSet, accelerator,
                 checkpoint: Path | None = None):
        self.recipe, self.train_cfg, self.data, self.accelerator = recipe, recipe.train, data, accelerator
        device = accelerator.device
        self.teacher_dtype = TRAIN_DTYPES[recipe.train.precision]
        self.tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
        folders = {"base": base, **{f"teacher{i}": f for i, f in enumerate(teachers)}}
        key_of, self.text_encoders = load_text_encoders(folders, device, self.teacher_dtype)
        self.student_text_key = key_of["base"]
        self.noise_schedule = DDPMScheduler.from_pretrained(base / "scheduler")
        self.alphas_cumprod = self.noise_schedule.alphas_cumprod.to(device)

        self.teachers = []
        for i, folder in enumerate(teachers):
            unet = load_component(UNet2DConditionModel, folder, "unet", self.teacher_dtype).to(device).eval()
            unet.requires_grad_(False)
            self.teachers.append(Teacher(unet, key_of[f"teacher{i}"], FeatureTaps(unet)))

        base_unet = load_component(UNet2DConditionModel, base, "unet", torch.float32)
        student = make_student(base_unet, len(teachers), recipe.train.seed)
        del base_unet
        self.step_done = 0
        state = None
        if checkpoint is not None:
            student.load_state_dict(load_file(checkpoint / "student.safetensors"))
            state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
            self.step_done = state["step"]
        student.train()
        self.student_taps = FeatureTaps(student)
        fused = {"fused": True} if device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(student.parameters(), lr=recipe.train.lr,
                                      weight_decay=recipe.train.weight_decay, **fused)
        warmup = recipe.train.warmup_steps
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            self.lr_schedule.load_state_dict(state["lr_schedule"])
            torch.set_rng_state(state["rng"])
        self.student, self.optimizer = accelerator.prepare(student, optimizer)

        ids = self.tokenize(data.captions)
        self.caption_ids = ids
        self.empty_ids = self.tokenize([""])[0]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    @property
    def num_styles(self) -> int:
        return len(self.teachers)

    def micro_batch(self, step: int, micro: int):
        """Everything random about one micro-batch, drawn from its own seeded generator."""
        cfg = self.train_cfg
        b, n = cfg.batch_size, self.num_styles
        g = torch.Generator().manual_seed(_seed_for(cfg.seed, step, micro, self.accelerator.process_index))
        idx = torch.randint(0, len(self.data), (b,), generator=g)
        # Balanced split of the batch across teachers, rotating the remainder; sorted so groups are contiguous.
        labels = ((torch.arange(b) * n // b + step + micro) % n).sort().values
        drop = torch.rand(b, generator=g) < cfg.caption_dropout
        latents = self.data.latents[idx]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (b,), generator=g)
        ids = torch.where(drop[:, None], self.empty_ids, self.caption_ids[idx])
        dev = self.accelerator.device
        return latents.to(dev), noise.to(dev), t.to(dev), ids.to(dev), labels.to(dev)

    def noisy(self, latents, noise, t):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    def teacher_targets(self, xt, t, ids, labels):
        """Each teacher's ε and block features on its share of the batch, concatenated in batch order."""
        eps, feats = [], []
        with torch.inference_mode():
            contexts = {key: enc(ids)[0] for key, enc in self.text_encoders.items()}
            for i, teacher in enumerate(self.teachers):
                rows = (labels == i).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                ctx = contexts[teacher.text_encoder_key][rows].to(self.teacher_dtype)
                eps.append(teacher.unet(xt[rows].to(self.teacher_dtype), t[rows], encoder_hidden_states=ctx).sample)
                feats.append(teacher.taps.take())
            student_ctx = contexts[self.student_text_key]
        # Ops outside inference mode turn the inference tensors into ordinary ones the loss can keep.
        target = torch.cat(eps).float()
        features = {k: torch.cat([f[k] for f in feats]) for k in feats[0]}
        return target, features, student_ctx.clone()

    def step(self, step: int) -> StepLosses:
        """Optimizer update number `step` (0-based), over `grad_accum` micro-batches."""
        cfg = self.train_cfg
        total = score_total = feat_total = 0.0
        for micro in range(cfg.grad_accum):
            latents, noise, t, ids, labels = self.micro_batch(step, micro)
            xt = self.noisy(latents, noise, t)
            target, teacher_feats, ctx = self.teacher_targets(xt, t, ids, labels)
            style = torch.nn.functional.one_hot(labels, self.num_styles).float()
            with self.accelerator.accumulate(self.student):
                eps = self.student(xt, t, encoder_hidden_states=ctx.float(), class_labels=style).sample
                s_loss = score_loss(eps, target)
                f_loss = feature_loss(self.student_taps.take(), teacher_feats, cfg.feature_loss.type)
                loss = s_loss + cfg.feature_loss.weight * f_loss
                self.accelerator.backward(loss)  # accelerate divides by the accumulation steps
                if self.accelerator.sync_gradients:
                    self.accelerator.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total, score_total, feat_total = total + loss.detach(), score_total + s_loss.detach(), \
                feat_total + f_loss.detach()
        self.lr_schedule.step()
        k = cfg.grad_accum
        return StepLosses(total / k, score_total / k, feat_total / k)

    def unwrapped_student(self) -> UNet2DConditionModel:
        return self.accelerator.unwrap_model(self.student)

    def save_checkpoint(self, folder: Path, step: int) -> None:
        """Model, optimizer, LR schedule and RNG state, written atomically (main process only)."""
        with atomic_folder(folder) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.unwrapped_student().state_dict().items()}
            save_file(state, tmp / "student.safetensors")
            torch.save({"step": step, "optimizer": self.optimizer.state_dict(),
                        "lr_schedule": self.lr_schedule.state_dict(), "rng": torch.get_rng_state()},
                       tmp / "state.pt")


def load_vae(base: Path, device) -> AutoencoderKL:
    return load_component(AutoencoderKL, base, "vae", torch.float32).to(device).eval()


class MetricsLog:
    """metrics.jsonl (and TensorBoard when it is installed), written by the main process."""

    def __init__(self, folder: Path, resume_step: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.jsonl"
        if self.path.is_file():  # drop lines past the checkpoint we resume from: they will be redone
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with atomic_file(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            self.tensorboard = None
        self.started = time.perf_counter()

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
