"""One student, many frozen teachers: the models, the optimizer step and its checkpoints.

A step's randomness, its noise included, follows from (seed, step, micro-batch) (distill/draws.py), so a
resumed run replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from .. import console
from ..errors import ModelError, is_out_of_memory
from ..models.student import FeatureTaps
from . import sharding
from .adversarial import Discriminator, discriminator_loss, generator_loss
from .losses import feature_loss, score_loss
from .prediction import x0_and_eps
from .step import Stopwatch, TeacherBank, TeacherRunner, compile_blocks, compile_cache, max_share, uncompile_blocks
from .models import Models
from .checkpoint import load_trainable
from .draws import Draws, MicroBatch
from .placement import Placement
from .text import TextContexts


@dataclass
class StepLosses:
    loss: torch.Tensor
    score: torch.Tensor
    feature: torch.Tensor
    adversarial: torch.Tensor | None = None  # generator term
    discriminator: torch.Tensor | None = None


@dataclass
class Teacher:
    unet: UNet2DConditionModel | None  # None: held by another process (train.teacher_placement: shard)
    text_encoder_key: str
    style: torch.Tensor | None = None  # a frozen previous student answers for an old style with this vector
    prediction: str = "epsilon"  # what it predicts; converted to what the student predicts


@dataclass
class DataSource:
    """Training items: latents and caption token ids (items, tokenizers, tokens); `labels` pins items to a teacher
    (its own generations); `time_ids` are SDXL's size conditioning of each item (original size, crop, target).
    The latest stage whose `from_step` has come supplies the micro-batches."""

    latents: torch.Tensor
    caption_ids: torch.Tensor
    labels: torch.Tensor | None = None
    from_step: int = 0
    time_ids: torch.Tensor | None = None
    stage: int = 0  # sources of one stage (aspect-ratio buckets of one folder) share its steps by their sizes


def lr_factor(step: int, *, warmup: int, total: int, shape: str) -> float:
    """train.lr's multiplier at `step`: a linear warm-up, then constant, or a cosine or straight decay to 0 at
    `total` steps."""
    if step < warmup or shape == "constant":
        return min(1.0, (step + 1) / (warmup + 1))
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress


@dataclass
class DeviceBatch:
    """One micro-batch's inputs on the device (`Trainer._on_device`)."""

    xt: torch.Tensor  # the noised latents
    t: torch.Tensor
    t2: torch.Tensor
    labels: torch.Tensor
    counts: list[int]  # samples per teacher, on the host
    contexts: dict  # text-encoder key -> Conditioning
    cond: object  # the student's Conditioning, float32
    time_ids: torch.Tensor | None
    renoise: torch.Tensor | None


class Trainer:
    """Holds the models and the optimizers; `step(k)` performs optimizer update k.

    Speed, on by default where it helps: teachers in the training dtype under inference_mode, each at one
    fixed shape and replayed as a CUDA graph (distill/step.py), the repeated blocks compiled with static
    shapes, cached latents and text contexts, noise drawn on the device, channels_last, fused AdamW, and no
    host synchronisation inside a step.
    """

    def __init__(self, cfg, models: Models, sources: list[DataSource], empty_ids: torch.Tensor, accelerator,
                 checkpoint: Path | None = None, placement: Placement | None = None):
        self.train_cfg, self.accelerator = cfg, accelerator
        self.placement = placement or Placement("replicate", accelerator.process_index, accelerator.num_processes,
                                                len(models.teachers), cfg.batch_size)
        device = accelerator.device
        cuda = device.type == "cuda"
        self.teacher_dtype = models.teacher_dtype
        self.alphas_cumprod = models.alphas_cumprod.to(device)
        self.num_train_timesteps = len(models.alphas_cumprod)
        self.student_text_key = models.student_text_key
        self.offload = cfg.teacher_offload == "cpu" and cuda
        self.device_rng = torch.Generator(device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # since the last all_finite()
        fast_layout = torch.channels_last if cuda else torch.contiguous_format
        self.memory_format = fast_layout

        styles = models.teacher_styles or [None] * len(models.teachers)
        self.prediction = models.prediction
        predictions = models.teacher_predictions or [models.prediction] * len(models.teachers)
        self.teachers = []
        prepared = set()
        for unet, key, style, prediction in zip(models.teachers, models.teacher_text_keys, styles, predictions):
            if unet is not None and id(unet) not in prepared:  # old-style slots share one frozen previous student
                prepared.add(id(unet))
                unet.eval().requires_grad_(False)
                if self.offload:
                    unet.to(memory_format=fast_layout)
                    for p in unet.parameters():
                        p.data = p.data.pin_memory()
                else:
                    unet.to(device, memory_format=fast_layout)
            self.teachers.append(Teacher(unet, key, style, prediction))
        runners, self.runners = {}, []  # one per UNet on the device; with offload, one slot per architecture
        for t in self.teachers:
            key = (t.style is not None) if self.offload else id(t.unet)
            if t.unet is not None and key not in runners:
                unet = copy.deepcopy(t.unet).to(device) if self.offload else t.unet
                runners[key] = TeacherRunner(unet, FeatureTaps(unet))
            self.runners.append(runners.get(key))
        old_styles = sum(style is not None for style in styles)
        self.draws = Draws(cfg, self.placement, sources, len(self.teachers), old_styles, self.num_train_timesteps)
        rows = max(max_share(self.draws.own_labels(r), len(self.teachers)) for r in range(len(self.teachers)))
        self.teacher_bank = TeacherBank(self.teachers, self.runners, rows, prediction=self.prediction,
                                        alphas_cumprod=self.alphas_cumprod, dtype=self.teacher_dtype,
                                        memory_format=fast_layout, offload=self.offload,
                                        graphs=cuda and cfg.cuda_graphs in (True, "auto"))

        student = models.student
        self.step_done = 0
        state = None
        if checkpoint is not None:
            load_trainable(student, checkpoint)
            state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
            self.step_done = state["step"]
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        self.skeleton = None  # with train.student_sharding fsdp: the student's weightless twin, for saving it
        if cfg.student_sharding == "fsdp" and accelerator.num_processes > 1:
            half = models.teacher_dtype if models.teacher_dtype != torch.float32 else None
            self.skeleton = sharding.shard(student.train(), device, half)  # its shards now on the device
        else:
            student.train().to(device, memory_format=fast_layout)
        self.student_taps = FeatureTaps(student)
        self.compiled = []
        if cfg.compile is True or cfg.compile == "auto" and cuda:
            self.compiled = [student, *{id(r.unet): r.unet for r in self.runners}.values()]
            compile_blocks(self.compiled)
        fused = {"fused": True} if cuda else {}
        trainable = [p for p in student.parameters() if p.requires_grad]
        if cfg.optimizer == "adamw-8bit":
            import bitsandbytes  # checked while planning

            optimizer = bitsandbytes.optim.AdamW8bit(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
            lr_factor, warmup=cfg.warmup_steps, total=cfg.max_steps, shape=cfg.lr_schedule))
        self.ema = None  # parameter name -> its running average, which becomes the saved student
        if cfg.ema is not None:
            saved = checkpoint / "ema.safetensors" if checkpoint is not None else None
            loaded = load_file(saved) if saved is not None and saved.is_file() else {}
            self.ema = {name: sharding.like(loaded[name], p) if name in loaded else p.detach().clone()
                        for name, p in student.named_parameters() if p.requires_grad}
        self.adversarial = cfg.adversarial_loss
        discriminator = d_optimizer = None
        if self.adversarial is not None:
            with torch.random.fork_rng(devices=[]):  # the head's initial weights follow the run's seed
                torch.manual_seed(cfg.seed)
                discriminator = Discriminator(models.discriminator_base, len(self.teachers)).to(device)
            if checkpoint is not None:
                discriminator.head.load_state_dict(load_file(checkpoint / "discriminator.safetensors"))
            d_optimizer = torch.optim.AdamW(discriminator.head.parameters(), lr=self.adversarial.lr, **fused)
        if state is not None:
            if self.skeleton is not None:
                sharding.load_optimizer_state(student, optimizer, state["optimizer"])
            else:
                optimizer.load_state_dict(state["optimizer"])
            self.lr_schedule.load_state_dict(state["lr_schedule"])
            torch.set_rng_state(state["rng"])
            if d_optimizer is not None:
                d_optimizer.load_state_dict(state["discriminator_optimizer"])
        if self.skeleton is not None:  # FSDP reduces the gradients itself: no DDP wrapper
            self.student, self.optimizer = student, accelerator.prepare(optimizer)
        else:
            self.student, self.optimizer = accelerator.prepare(student, optimizer)
        self.discriminator = self.d_optimizer = None
        if discriminator is not None:
            self.discriminator, self.d_optimizer = accelerator.prepare(discriminator, d_optimizer)

        self.sources = []
        for source in sources:
            if source.time_ids is None and student.config.addition_embed_type == "text_time":
                raise ModelError("an SDXL student trains on data with size conditioning (DataSource.time_ids)")
            fits = source.latents.numel() * source.latents.element_size() <= 2 << 30
            self.sources.append((source, source.latents.to(device) if fits else source.latents,
                                 TextContexts(models.text_encoders, source.caption_ids, empty_ids, device)))

    @property
    def num_styles(self) -> int:
        return len(self.teachers)

    def noise(self, mb: MicroBatch, shape: tuple, renoise: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The micro-batch's noise, and the adversarial loss's re-noise only when it is used, drawn where they
        are used: no host-side draw, no copy from pageable memory. Drawn for the whole step batch, so a sample's
        noise does not depend on which process trains it."""
        g = self.device_rng.manual_seed(mb.seed)
        dev = self.accelerator.device
        whole = shape if mb.rows is None else (self.placement.step_batch, *shape[1:])
        noise = torch.randn(whole, generator=g, device=dev)
        renoised = torch.randn(whole, generator=g, device=dev) if renoise else None
        if mb.rows is None:
            return noise, renoised
        rows = mb.rows.to(dev)
        return noise.index_select(0, rows), None if renoised is None else renoised.index_select(0, rows)

    def teacher_targets(self, xt, t, contexts, counts: list[int], time_ids=None):
        """Each teacher's prediction (as the student's prediction type) and block features on its share of the
        batch, in batch order (distill/step.py runs them)."""
        return self.teacher_bank(xt, t, contexts, counts, time_ids)

    def _on_device(self, mb: MicroBatch, renoise: bool) -> DeviceBatch:
        """A micro-batch's inputs on the device: its small draws in one (pinned) copy, its noise drawn there."""
        dev = self.accelerator.device
        counts = torch.bincount(mb.labels, minlength=self.num_styles).tolist()  # on the CPU: no device sync
        source, latents, text = self.sources[mb.source]
        small = torch.stack([mb.idx, mb.labels, mb.drop.long(), mb.t, mb.t2])
        idx, labels, drop, t, t2 = (small.pin_memory() if dev.type == "cuda" else small).to(dev, non_blocking=True)
        x0 = (latents[idx] if latents.device == dev else latents[mb.idx].to(dev, non_blocking=True)).float()
        noise, renoised = self.noise(mb, x0.shape, renoise)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        contexts = text(idx, drop.bool())
        return DeviceBatch(
            xt=a.sqrt() * x0 + (1 - a).sqrt() * noise, t=t, t2=t2, labels=labels, counts=counts, contexts=contexts,
            cond=contexts[self.student_text_key].to(torch.float32).clone(),
            time_ids=None if source.time_ids is None else source.time_ids[mb.idx].to(dev, non_blocking=True),
            renoise=renoised)

    def _student_loss(self, batch: DeviceBatch, target, teacher_feats):
        cfg = self.train_cfg
        style = torch.nn.functional.one_hot(batch.labels, self.num_styles).float()
        # a prepared (DDP) student autocasts inside its forward; a sharded one is not prepared
        with self.accelerator.autocast() if self.skeleton is not None else contextlib.nullcontext():
            prediction = self.student(batch.xt.contiguous(memory_format=self.memory_format), batch.t,
                                      class_labels=style, **batch.cond.unet_kwargs(batch.time_ids)).sample
        s_loss = score_loss(prediction, target)
        f_loss = feature_loss(self.student_taps.take(), teacher_feats, cfg.feature_loss.type, cfg.feature_loss.reduce)
        return prediction, s_loss, f_loss

    def step(self, step: int) -> StepLosses:
        """Optimizer update number `step` (0-based), over `grad_accum` micro-batches. Nothing in it waits for
        the device: losses come back as device tensors, and `nonfinite` gathers whether any loss or gradient
        norm was NaN or infinite, for the caller to look at when it syncs anyway."""
        cfg = self.train_cfg
        adversarial = self.adversarial is not None and step >= self.adversarial.start_step
        sums = {"loss": 0.0, "score": 0.0, "feature": 0.0, "adversarial": 0.0, "discriminator": 0.0}
        for micro in range(cfg.grad_accum):
            mb = self.draws.micro_batch(step, micro)
            batch = self._on_device(mb, adversarial)
            xt, t, t2, labels, cond, time_ids, renoise = (batch.xt, batch.t, batch.t2, batch.labels, batch.cond,
                                                          batch.time_ids, batch.renoise)
            target, teacher_feats = self.teacher_targets(xt, t, batch.contexts, batch.counts, time_ids)
            with self.accelerator.accumulate(self.student):
                prediction, s_loss, f_loss = self._student_loss(batch, target, teacher_feats)
                loss = s_loss + cfg.feature_loss.weight * f_loss
                if adversarial:
                    a2 = self.alphas_cumprod[t2].view(-1, 1, 1, 1)
                    alpha_bar = self.alphas_cumprod[t]
                    fake_x0 = x0_and_eps(prediction.float(), self.prediction, xt, alpha_bar)[0]
                    real_x0 = x0_and_eps(target, self.prediction, xt, alpha_bar)[0]
                    fake = a2.sqrt() * fake_x0 + (1 - a2).sqrt() * renoise
                    real = a2.sqrt() * real_x0 + (1 - a2).sqrt() * renoise
                    g_loss = generator_loss(self.discriminator(fake, t2, cond, time_ids), labels)
                    loss = loss + self.adversarial.weight * g_loss
                self.accelerator.backward(loss * mb.weight if mb.weight != 1 else loss)  # and / accumulation steps
                if self.accelerator.sync_gradients:
                    norm = self.accelerator.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
                    self.nonfinite |= ~torch.isfinite(sharding.full(norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if adversarial:  # the discriminator's own step, after the generator's
                self.d_optimizer.zero_grad(set_to_none=True)
                # one forward for both halves, as DDP expects one forward per backward
                logits = self.discriminator(torch.cat([fake.detach(), real]), t2.repeat(2), cond.repeat(2),
                                            None if time_ids is None else time_ids.repeat(2, 1))
                d_loss = discriminator_loss(*logits.chunk(2), labels, self.num_styles)
                self.accelerator.backward(d_loss * mb.weight if mb.weight != 1 else d_loss)
                self.d_optimizer.step()
                self.d_optimizer.zero_grad(set_to_none=True)
                sums["adversarial"] = sums["adversarial"] + g_loss.detach() * mb.weight
                sums["discriminator"] = sums["discriminator"] + d_loss.detach() * mb.weight
            # weighted as the gradients are: the processes' mean is the step's
            sums["loss"] = sums["loss"] + loss.detach() * mb.weight
            sums["score"] = sums["score"] + s_loss.detach() * mb.weight
            sums["feature"] = sums["feature"] + f_loss.detach() * mb.weight
            self.nonfinite |= ~torch.isfinite(loss.detach())
        self.lr_schedule.step()
        if self.ema is not None:
            self._update_ema(step)
        k = cfg.grad_accum
        return StepLosses(sums["loss"] / k, sums["score"] / k, sums["feature"] / k,
                          sums["adversarial"] / k if adversarial else None,
                          sums["discriminator"] / k if adversarial else None)

    def _update_ema(self, step: int) -> None:
        """Copy the weights before ema.start_step, average them from it on: one fused op over all tensors."""
        averages = [sharding.local(a) for a in self.ema.values()]
        weights = [sharding.local(p.detach()) for p in self.unwrapped_student().parameters() if p.requires_grad]
        with torch.no_grad():
            if step < self.train_cfg.ema.start_step:
                torch._foreach_copy_(averages, weights)
            else:
                torch._foreach_lerp_(averages, weights, 1 - self.train_cfg.ema.decay)

    def final_student(self) -> UNet2DConditionModel | None:
        """The student to save: its EMA weights where the run keeps an average (the run is over: they replace the
        trained ones in place). Every process calls it; a sharded student comes back whole on the main process
        only (None elsewhere)."""
        student = self.unwrapped_student()
        if self.ema is not None:
            with torch.no_grad():
                for name, p in student.named_parameters():
                    if name in self.ema:
                        sharding.local(p).copy_(sharding.local(self.ema[name]))
        if self.skeleton is None:
            return student
        weights = sharding.model_state(student)
        return sharding.plain_copy(self.skeleton, weights) if self.accelerator.is_main_process else None

    def mean_losses(self, losses: StepLosses) -> dict[str, float]:
        """A step's losses as logged: the mean over every process's samples (a device sync)."""
        values = {"loss": losses.loss, "score_loss": losses.score, "feature_loss": losses.feature}
        if losses.adversarial is not None:
            values.update(adversarial_loss=losses.adversarial, discriminator_loss=losses.discriminator)
        stacked = torch.stack(list(values.values()))
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.reduce(stacked, "mean")
        return dict(zip(values, stacked.tolist()))

    def all_finite(self) -> bool:
        """Whether every loss and gradient norm since the last call was finite, on every process (a device sync)."""
        bad = self.nonfinite.float()
        if self.accelerator.num_processes > 1:  # every rank stops together
            bad = self.accelerator.reduce(bad, "sum")
        self.nonfinite.zero_()
        return bool(bad.item() == 0)

    def warm_up(self) -> None:
        """The compile stage: each data shape's teacher forwards (captured as CUDA graphs where on) and student
        forward and backward run once on real rows, before the first step, so no step compiles or captures
        anything. Timed on stderr. If compiling fails or overruns train.compile_budget_s, the run goes on
        eagerly, with one warning; nothing it ran changes the training (its gradients are dropped)."""
        if not self.compiled and not self.teacher_bank.graphs:
            return
        shapes = sorted({tuple(source.latents.shape[1:]) for source, *_ in self.sources})
        where = ""
        if self.compiled:
            config = dict(self.unwrapped_student().config)
            where = compile_cache(config, self.accelerator.device)
        console.say(f"compile: {len(shapes)} shape{'s' * (len(shapes) > 1)}"
                    + (f", blocks of {len(self.compiled)} UNets, cache {where}" if self.compiled else "")
                    + (", teachers as CUDA graphs" if self.teacher_bank.graphs else "") + " ...")
        clock = Stopwatch(self.train_cfg.compile_budget_s)
        try:
            done = set()
            with clock.watching(self.compiled):
                for k, (source, *_rest) in enumerate(self.sources):
                    shape = tuple(source.latents.shape[1:])
                    if shape in done:
                        continue
                    done.add(shape)
                    sizes = set()  # with shard, this process's share of the batch may differ from step to step
                    for rotate in range(self.num_styles):
                        size = len(self.draws.own_labels(rotate))
                        if size not in sizes:
                            sizes.add(size)
                            self._rehearse(k, rotate)
            if self.accelerator.device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # a compiler bug or a budget overrun must not cost the run
            if is_out_of_memory(e):  # nor is it either: the step itself would not fit
                raise
            uncompile_blocks(self.compiled)
            for runner in self.runners:  # graphs captured around compiled code go with it: recaptured eagerly
                runner.graphs.clear()
            torch._dynamo.reset()
            self.compiled = []
            self.optimizer.zero_grad(set_to_none=True)
            while getattr(e, "inner_exception", None) or e.__cause__:  # the compiler's own error, not dynamo's wrapper
                e = getattr(e, "inner_exception", None) or e.__cause__
            reason = next((line for line in str(e).splitlines() if line.strip()), "no message")[:200]
            console.warn(f"compile stopped after {clock.elapsed:.0f} s ({type(e).__name__}: {reason}); "
                         "training without it")
            return
        console.say(f"compile: done in {clock.elapsed:.1f} s")

    def _rehearse(self, source_index: int, rotate: int) -> None:
        """One micro-batch's forwards and backward on source `source_index`, through the step's own path, with no
        optimizer update; `rotate` picks the split of the step batch, so this process's share of it."""
        labels = self.draws.own_labels(rotate)
        b = len(labels)
        idx = torch.arange(b) % len(self.sources[source_index][0].latents)
        mb = MicroBatch(idx, labels, torch.zeros(b, dtype=torch.bool),
                        torch.full((b,), self.num_train_timesteps // 2), torch.zeros(b, dtype=torch.long),
                        source_index, seed=0)
        batch = self._on_device(mb, renoise=False)
        target, feats = self.teacher_targets(batch.xt, batch.t, batch.contexts, batch.counts, batch.time_ids)
        _, s_loss, f_loss = self._student_loss(batch, target, feats)
        self.accelerator.backward(s_loss + f_loss)
        self.optimizer.zero_grad(set_to_none=True)

    def layout(self) -> dict:
        """How the run was spread over processes: a checkpoint records it, and a resume must keep it."""
        return {"processes": self.placement.processes, "teacher_placement": self.placement.kind,
                "student_sharding": "fsdp" if self.skeleton is not None else "none"}

    def unwrapped_student(self) -> UNet2DConditionModel:
        return self.accelerator.unwrap_model(self.student)
