"""One student, many frozen teachers: the distillation step, checkpoints and the training loop.

All randomness of step k (which samples, which teacher, caption drop, noise, timesteps) comes from
a generator seeded by (seed, k, micro-batch, rank), so a resumed run replays exactly what an
uninterrupted one would have done.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from ..checkpoint import atomic_file, atomic_folder, component_sha256
from ..pipeline import load_component
from ..recipe import Recipe
from ..student import FeatureTaps, make_student
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


@dataclass
class Models:
    """Everything a distillation step runs: built from folders by `load_models`, or in memory by benchmarks."""

    student: UNet2DConditionModel  # fp32 master weights, already style-promptable
    teachers: list[UNet2DConditionModel]
    teacher_text_keys: list[str]  # which text encoder each teacher reads
    text_encoders: dict[str, CLIPTextModel]
    student_text_key: str
    alphas_cumprod: torch.Tensor
    teacher_dtype: torch.dtype


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


def load_models(recipe: Recipe, base: Path, teachers: list[Path], device: torch.device) -> Models:
    dtype = TRAIN_DTYPES[recipe.train.precision]
    folders = {"base": base, **{f"teacher{i}": f for i, f in enumerate(teachers)}}
    key_of, encoders = load_text_encoders(folders, device, dtype)
    teacher_device = "cpu" if recipe.train.teacher_offload == "cpu" else device
    teacher_unets = [load_component(UNet2DConditionModel, f, "unet", dtype).to(teacher_device) for f in teachers]
    base_unet = load_component(UNet2DConditionModel, base, "unet", torch.float32)
    student = make_student(base_unet, len(teachers), recipe.train.seed)
    schedule = DDPMScheduler.from_pretrained(base / "scheduler")
    return Models(student, teacher_unets, [key_of[f"teacher{i}"] for i in range(len(teachers))], encoders,
                  key_of["base"], schedule.alphas_cumprod.clone(), dtype)


class TextContexts:
    """Text-encoder outputs per caption. Cached on the device for every distinct caption when that fits."""

    def __init__(self, encoders: dict[str, CLIPTextModel], caption_ids: torch.Tensor, empty_ids: torch.Tensor,
                 device: torch.device, budget_bytes: int = 1 << 30):
        self.encoders = encoders
        unique, index = torch.unique(torch.cat([caption_ids, empty_ids[None]]), dim=0, return_inverse=True)
        self.caption_rows, self.empty_row = index[:-1], int(index[-1])
        self.caption_ids, self.empty_ids = caption_ids, empty_ids
        width = max(e.config.hidden_size for e in encoders.values())
        size = len(unique) * caption_ids.shape[1] * width * 2 * len(encoders)
        self.cache = None
        if size <= budget_bytes:
            with torch.inference_mode():
                self.cache = {key: torch.cat([enc(chunk.to(device))[0] for chunk in unique.split(256)])
                              for key, enc in encoders.items()}
            self.caption_rows = self.caption_rows.to(device)

    def __call__(self, idx: torch.Tensor, drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Contexts for dataset items `idx` (caption dropped where `drop`), one tensor per text encoder."""
        if self.cache is not None:
            rows = torch.where(drop, self.empty_row, self.caption_rows[idx])
            return {key: cached[rows] for key, cached in self.cache.items()}
        ids = torch.where(drop[:, None].cpu(), self.empty_ids, self.caption_ids[idx.cpu()])
        with torch.inference_mode():
            return {key: enc(ids.to(next(enc.parameters()).device))[0] for key, enc in self.encoders.items()}


class Trainer:
    """Holds the models and the optimizer; `step(k)` performs optimizer update k.

    Speed, on by default where it helps: teachers in the training dtype under inference_mode, one
    batched forward per teacher, cached latents and text contexts, channels_last and torch.compile on
    CUDA, fused AdamW, and no host synchronisation inside a step.
    """

    def __init__(self, cfg, models: Models, latents: torch.Tensor, caption_ids: torch.Tensor,
                 empty_ids: torch.Tensor, accelerator, checkpoint: Path | None = None):
        self.train_cfg, self.accelerator = cfg, accelerator
        device = accelerator.device
        cuda = device.type == "cuda"
        self.teacher_dtype = models.teacher_dtype
        self.alphas_cumprod = models.alphas_cumprod.to(device)
        self.num_train_timesteps = len(models.alphas_cumprod)
        self.student_text_key = models.student_text_key
        self.offload = cfg.teacher_offload == "cpu" and cuda
        fast_layout = torch.channels_last if cuda else torch.contiguous_format
        self.memory_format = fast_layout

        self.teachers = []
        for unet, key in zip(models.teachers, models.teacher_text_keys):
            unet.eval().requires_grad_(False)
            if self.offload:
                unet.to(memory_format=fast_layout)
                for p in unet.parameters():
                    p.data = p.data.pin_memory()
            else:
                unet.to(device, memory_format=fast_layout)
            self.teachers.append(Teacher(unet, key))
        if self.offload:  # one device-side slot; each teacher's weights are copied in when its turn comes
            slot = copy.deepcopy(models.teachers[0]).to(device)
            self.slot = Teacher(slot, "", FeatureTaps(slot))
        else:
            for t in self.teachers:
                t.taps = FeatureTaps(t.unet)

        student = models.student
        self.step_done = 0
        state = None
        if checkpoint is not None:
            student.load_state_dict(load_file(checkpoint / "student.safetensors"))
            state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
            self.step_done = state["step"]
        student.train().to(device, memory_format=fast_layout)
        self.student_taps = FeatureTaps(student)
        compile_now = cfg.compile is True or cfg.compile == "auto" and cuda
        if compile_now:
            student.compile()
            for t in ([self.slot] if self.offload else self.teachers):
                t.unet.compile()
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      **({"fused": True} if cuda else {}))
        warmup = cfg.warmup_steps
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            self.lr_schedule.load_state_dict(state["lr_schedule"])
            torch.set_rng_state(state["rng"])
        self.student, self.optimizer = accelerator.prepare(student, optimizer)

        fits = latents.numel() * latents.element_size() <= 2 << 30
        self.latents = latents.to(device) if fits else latents
        self.num_items = len(latents)
        self.contexts = TextContexts(models.text_encoders, caption_ids, empty_ids, device)

    @property
    def num_styles(self) -> int:
        return len(self.teachers)

    def micro_batch(self, step: int, micro: int):
        """Everything random about one micro-batch, drawn on the CPU from its own seeded generator."""
        cfg = self.train_cfg
        b, n = cfg.batch_size, self.num_styles
        g = torch.Generator().manual_seed(_seed_for(cfg.seed, step, micro, self.accelerator.process_index))
        idx = torch.randint(0, self.num_items, (b,), generator=g, device="cpu")
        # Balanced split of the batch across teachers, rotating the remainder; sorted so groups are contiguous.
        labels = ((torch.arange(b, device="cpu") * n // b + step + micro) % n).sort().values
        drop = torch.rand(b, generator=g, device="cpu") < cfg.caption_dropout
        noise = torch.randn((b, *self.latents.shape[1:]), generator=g, device="cpu")
        t = torch.randint(0, self.num_train_timesteps, (b,), generator=g, device="cpu")
        return idx, labels, drop, noise, t

    def teacher_targets(self, xt, t, contexts, counts: list[int]):
        """Each teacher's ε and block features on its share of the batch, concatenated in batch order."""
        eps, feats = [], []
        start = 0
        with torch.inference_mode():
            for teacher, count in zip(self.teachers, counts):
                if count == 0:
                    continue
                rows = slice(start, start + count)
                start += count
                runner = teacher
                if self.offload:
                    for dst, src in zip(self.slot.unet.parameters(), teacher.unet.parameters()):
                        dst.copy_(src, non_blocking=True)
                    runner = self.slot
                ctx = contexts[teacher.text_encoder_key][rows].to(self.teacher_dtype)
                x = xt[rows].to(self.teacher_dtype).contiguous(memory_format=self.memory_format)
                eps.append(runner.unet(x, t[rows], encoder_hidden_states=ctx).sample)
                feats.append(runner.taps.take())
        # Ops outside inference mode turn the inference tensors into ordinary ones the loss can keep.
        target = torch.cat(eps).float()
        features = {k: torch.cat([f[k] for f in feats]) for k in feats[0]}
        return target, features

    def step(self, step: int) -> StepLosses:
        """Optimizer update number `step` (0-based), over `grad_accum` micro-batches."""
        cfg = self.train_cfg
        dev = self.accelerator.device
        total = score_total = feat_total = 0.0
        for micro in range(cfg.grad_accum):
            idx, labels, drop, noise, t = self.micro_batch(step, micro)
            counts = torch.bincount(labels, minlength=self.num_styles).tolist()  # on the CPU: no device sync
            latents = self.latents[idx.to(self.latents.device)].to(dev, non_blocking=True)
            t, noise = t.to(dev, non_blocking=True), noise.to(dev, non_blocking=True)
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * latents + (1 - a).sqrt() * noise
            contexts = self.contexts(idx.to(dev, non_blocking=True), drop.to(dev, non_blocking=True))
            target, teacher_feats = self.teacher_targets(xt, t, contexts, counts)
            ctx = contexts[self.student_text_key].clone().float()
            style = torch.nn.functional.one_hot(labels.to(dev, non_blocking=True), self.num_styles).float()
            with self.accelerator.accumulate(self.student):
                x = xt.contiguous(memory_format=self.memory_format)
                eps = self.student(x, t, encoder_hidden_states=ctx, class_labels=style).sample
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


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
