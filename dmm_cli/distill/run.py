"""`dmm distill`, second half: train the planned run, checkpointing as it goes, and write the student."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from .. import console, interrupts
from ..data.sources import FolderImages, open_images, resolve_data
from ..errors import DMMError, OutOfMemory, ProcessLost, out_of_memory
from ..files import state
from ..files.atomic import atomic_file, clear_temporaries, output_lock
from ..files.hashing import component_sha256
from ..recipe import Recipe
from .latents import encode_items
from . import checkpoint
from .placement import Placement, teacher_ranges
from .plan import CHECKPOINTS, RUN_FILE, RunPlan, bucket_multiple, checkpoints, synthesis_settings
from .student_folder import shared_recipe, write_student


class Interrupted(DMMError):
    exit_code = 130


def _accelerator(recipe: Recipe):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=recipe.train.precision, gradient_accumulation_steps=recipe.train.grad_accum,
                       cpu=not torch.cuda.is_available())


def run(plan: RunPlan) -> Path:
    """Train the student and write it into the run folder; returns that folder."""
    accelerator = _accelerator(plan.recipe)
    # One writer per run folder: only the main process writes it, and it holds the lock.
    with output_lock(plan.output) if accelerator.is_main_process else contextlib.nullcontext():
        return _train(plan, accelerator)


def _train(plan: RunPlan, accelerator) -> Path:
    from tqdm.auto import tqdm

    from ..models.attention import choose_attention
    from .text import load_tokenizers, tokenize
    from .models import load_models
    from .trainer import Trainer

    recipe, out, cfg = plan.recipe, plan.output, plan.recipe.train
    main = accelerator.is_main_process
    if main:
        for folder in (out, out / CHECKPOINTS):  # what a killed run left half-written
            clear_temporaries(folder)
    tokenizers = load_tokenizers(plan.base)
    with accelerator.main_process_first():  # one process writes each fused LoRA teacher, the others read it
        plan = plan.with_loras_fused()
    with accelerator.main_process_first():  # before the run folder: bad data leaves no folder behind
        sources = data_sources(plan, tokenizers, accelerator.device)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if plan.overwrite and (out / CHECKPOINTS).exists():
            shutil.rmtree(out / CHECKPOINTS)
        with atomic_file(out / RUN_FILE) as tmp:
            tmp.write_text(json.dumps({"name": recipe.name, "fingerprint": recipe.fingerprint(),
                                       "recipe": shared_recipe(recipe)}, indent=2), encoding="utf-8")
    placement = Placement(plan.placement, accelerator.process_index, accelerator.num_processes, len(plan.teachers),
                          cfg.batch_size)
    if main and accelerator.num_processes > 1:
        console.say(describe_layout(plan, placement))
    models = load_models(recipe, plan.base, plan.teachers, accelerator.device, plan.previous, placement.held)
    side = max((tuple(s.latents.shape[2:]) for s in sources), key=lambda hw: hw[0] * hw[1])  # costs the most
    if choose_attention(cfg.attention, accelerator.device, models.teacher_dtype, unet=models.student,
                        latent_size=side, batch=cfg.batch_size, backward=True) == "xformers":
        for unet in {id(u): u for u in [models.student, *models.teachers]}.values():
            unet.enable_xformers_memory_efficient_attention()
    trainer = Trainer(cfg, models, sources, tokenize(tokenizers, [""])[0], accelerator, plan.resume_from, placement)
    start = trainer.step_done
    log = MetricsLog(out / "logs", start) if main else None
    if start and main:
        console.say(f"distill: resuming from {plan.resume_from} (step {start})")
    try:
        trainer.warm_up()
    except Exception as e:
        raise _memory_error(e, "in the compile stage", plan) or e
    samples_per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    bar = tqdm(total=cfg.max_steps, initial=start, desc="distill", disable=not main or console.progress_disabled())
    step, last, tick = start, None, time.perf_counter()
    checked = start  # every step up to here had finite losses and gradients

    def check_finite() -> None:
        """Steps queue up on the device unchecked; this one sync, at log steps and before every checkpoint,
        keeps a NaN from ever reaching a checkpoint or the student."""
        nonlocal checked
        if not trainer.all_finite():
            kept = checkpoints(out)
            where = f"its last good checkpoint is {kept[-1]}" if kept else "no checkpoint was saved"
            raise DMMError(f"distill: the loss became non-finite (NaN or Inf) between steps {checked + 1} and {step}, "
                           f"so the run stopped ({where}); lower train.lr or check the teachers")
        checked = step

    try:
        while step < cfg.max_steps:
            with interrupts.deferred():  # a Ctrl-C lands between steps, so a checkpoint never holds half a step
                losses = trainer.step(step)
                step += 1
            bar.update()
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                check_finite()
                now = time.perf_counter()
                done = step - (last["step"] if last else start)
                last = {"step": step, **trainer.mean_losses(losses), "lr": trainer.lr_schedule.get_last_lr()[0],
                        "samples_per_s": round(done * samples_per_step / max(now - tick, 1e-9), 2),
                        "processes": accelerator.num_processes}
                if accelerator.device.type == "cuda":  # the busiest process's
                    peak = torch.tensor([torch.cuda.max_memory_allocated()], device=accelerator.device)
                    last["gpu_peak_gib"] = round(int(accelerator.gather(peak).max()) / 2**30, 2)
                tick = now
                bar.set_postfix(loss=f"{last['loss']:.4f}", sps=last["samples_per_s"])
                if main:
                    log.write(last)
            if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                check_finite()
                with interrupts.deferred():
                    _checkpoint(trainer, out, step, cfg.keep_checkpoints, main)
                accelerator.wait_for_everyone()
    except KeyboardInterrupt:
        bar.close()
        try:
            with interrupts.deferred(reraise=False):  # a second Ctrl-C must not cost the first one's checkpoint
                check_finite()
                _checkpoint(trainer, out, step, cfg.keep_checkpoints, main)
        except Exception as e:  # a launcher stops every process when one dies: the others cannot checkpoint
            if not lost_process(e, accelerator.num_processes):
                raise
            raise _lost(e, step, out) from None
        raise Interrupted(f"interrupted at step {step}; checkpoint saved in {out / CHECKPOINTS}; continue with "
                          "--resume") from None
    except Exception as e:
        memory = _memory_error(e, f"at step {step + 1}", plan)
        if memory is not None:
            raise memory from None
        if not lost_process(e, accelerator.num_processes):
            raise
        raise _lost(e, step, out) from None
    finally:
        bar.close()
        if log is not None:
            log.close()
    accelerator.wait_for_everyone()
    check_finite()
    _checkpoint(trainer, out, step, cfg.keep_checkpoints, main)
    student = trainer.final_student()  # every process: a sharded student is gathered
    if main:
        write_student(plan, student, last or {"step": step})
        state.remember_last_model(out)
    accelerator.wait_for_everyone()
    return out


def lost_process(error: Exception, processes: int) -> bool:
    """Whether `error` is a collective failing because another process of the run died or hung."""
    if processes == 1:
        return False
    return isinstance(error, torch.distributed.DistError) or any(w in str(error) for w in ("gloo", "NCCL"))


def _last_checkpoint(out: Path) -> str:
    kept = checkpoints(out)
    return f"its last checkpoint is {kept[-1]}" if kept else "no checkpoint was saved yet"


def _memory_error(error: Exception, doing: str, plan: RunPlan) -> OutOfMemory | None:
    return out_of_memory(error, doing, f"{_last_checkpoint(plan.output)}; `dmm distill {plan.recipe_path} --dry-run` "
                         "plans this run's memory and names settings that fit")


def _lost(error: Exception, step: int, out: Path) -> ProcessLost:
    return _process_lost(error, f" near step {step}", f"{_last_checkpoint(out)}; continue with --resume")


def lost_process_behind(stop: KeyboardInterrupt) -> ProcessLost | None:
    """The lost process behind a stop signal that landed while this process was failing because of it (the
    launcher stops every process when one dies): that, not the interrupt, is the news."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    cause, seen = stop.__context__, set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ProcessLost):
            return cause
        if lost_process(cause, processes):  # the step is not known here
            return _process_lost(cause, "", "continue from its last checkpoint with --resume")
        cause = cause.__cause__ or cause.__context__
    return None


def _process_lost(error: BaseException, near: str, then: str) -> ProcessLost:
    interrupts.ignore()  # the launcher stops this process too: its signal must not replace this error
    said = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)[:160]
    return ProcessLost(f"distill: another process of this run stopped or stopped answering{near}, so this one "
                       f"stopped too ({then}); the collective said: {said}")


def describe_layout(plan: RunPlan, placement: Placement) -> str:
    """One stderr line: how the run spreads over its processes."""
    n = placement.processes
    if placement.kind == "shard":
        teachers = "teachers sharded (" + ", ".join(
            f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}" for r in teacher_ranges(placement.teachers, n)
        ) + " by process)"
    else:
        teachers = "every teacher on every process"
    student = "student sharded (FSDP2)" if plan.sharded else "student replicated (DDP)"
    return f"distill: {n} processes, {teachers}, {student}, {placement.step_batch} samples a step (per micro-batch)"


def data_sources(plan: RunPlan, tokenizers, device) -> list:
    """The run's training data as latents: the image folder, then (or only) each teacher's own generations."""
    from ..generate.samples import sample_set
    from ..models.devices import pick_dtype
    from ..models.pipeline import load_pipeline
    from ..models.styles import one_hot
    from .text import tokenize
    from .models import load_vae
    from .trainer import DataSource

    recipe = plan.recipe
    vae = load_vae(plan.base, device)
    vae_sha = component_sha256(plan.base / "vae")
    resolution = recipe.data.resolution or vae.config.sample_size
    sources = []
    data = recipe.data
    if data.folder is not None:
        images = open_images(resolve_data(data.folder), data.image_column, data.caption_column)
        multiple = bucket_multiple(plan.base) if data.buckets else None
        for real in encode_items(images, vae, vae_sha, resolution, device, max_bad_fraction=data.max_bad_fraction,
                                 bucket_multiple=multiple):
            sources.append(DataSource(real.latents, tokenize(tokenizers, real.captions), time_ids=real.time_ids))
    synth = recipe.data.synthesize
    if synth is not None:
        old = len(plan.previous_styles.names) if plan.previous_styles else 0
        prompts = [plan.synthesis_prompts[k % len(plan.synthesis_prompts)] for k in range(synth.images_per_teacher)]
        settings = synthesis_settings(synth)
        latents, captions, labels, sizes = [], [], [], []
        for i, (spec, folder) in enumerate(zip(recipe.teachers, plan.teachers)):
            model = folder or plan.previous  # old styles come from the previous student itself
            style = one_hot(i, old) if folder is None else None
            samples = sample_set(lambda m=model: load_pipeline(m, device, pick_dtype("auto", device)), model, style,
                                 prompts, settings, 16, f"synthesize {spec.name}")
            items = FolderImages(list(zip(samples.paths(), samples.prompts)), f"generations of {spec.name}")
            encoded, = encode_items(items, vae, vae_sha, resolution, device)  # one size: the teacher's
            latents.append(encoded.latents)
            sizes.append(encoded.time_ids)
            captions += encoded.captions
            labels += [i] * len(encoded.captions)
        sources.append(DataSource(torch.cat(latents), tokenize(tokenizers, captions), torch.tensor(labels),
                                  synth.after_step if data.folder is not None else 0, torch.cat(sizes), stage=1))
    return sources


def _checkpoint(trainer, out: Path, step: int, keep: int, main: bool) -> None:
    """Every process takes part (a sharded student is gathered); the main one writes."""
    checkpoint.save(trainer, out / CHECKPOINTS / f"step-{step:07d}", step, write=main)
    if main:
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)


class MetricsLog:
    """metrics.jsonl (and TensorBoard when it is installed), written by the main process."""

    def __init__(self, folder: Path, resume_step: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.jsonl"
        if self.path.is_file():  # drop lines past the checkpoint we resume from: they will be redone
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with atomic_file(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = open(self.path, "a", encoding="utf-8")
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
