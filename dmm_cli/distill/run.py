"""`dmm distill` as functions: check everything up front (plan), then train and write the student (run)."""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from .. import console
from ..data.prompts import prompt_digest
from ..data.sources import FolderImages, open_images, resolve_data
from ..errors import BadInput, DMMError, ModelError, RecipeError
from ..files import state
from ..files.atomic import atomic_file, atomic_folder, clear_temporaries, output_lock
from ..files.hashing import component_sha256
from ..files.safetensors_header import component_shapes
from ..generate.sampling import SYNTHESIS_SEEDS
from ..interrupts import deferred
from ..models import lora, references
from ..models.folders import (
    check_links,
    check_pipeline_folder,
    copy_part,
    derived_model_index,
    model_family,
    model_root,
    parts_besides_unet,
)
from ..models.schedule import read_schedule
from ..models.styles import STYLES_FILE, Style, StyleTable
from ..recipe import Recipe, Synthesize, load_recipe
from .latents import encode_items

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"


class Interrupted(DMMError):
    exit_code = 130


@dataclass
class RunPlan:
    recipe: Recipe
    recipe_path: Path
    output: Path
    base: Path
    teachers: list[Path | None]  # None: an old style of `previous`
    data: DataPlan
    resume_from: Path | None
    overwrite: bool
    previous: Path | None = None
    previous_styles: StyleTable | None = None
    synthesis_prompts: list[str] | None = None  # data.synthesize's prompts, read once while planning
    teacher_loras: list[list] = field(default_factory=list)  # each teacher's checked LoRAs (models.lora)

    def with_loras_fused(self) -> RunPlan:
        """The plan with each LoRA teacher's folder its fused copy, written once (not for a dry run)."""
        if not any(self.teacher_loras):
            return self
        return replace(self, teachers=[lora.fused_folder(t, own) if own else t
                                       for t, own in zip(self.teachers, self.teacher_loras)], teacher_loras=[])

    def memory(self) -> dict:
        """The peak GPU memory estimate (distill/memory.py) and the settings that fit common cards."""
        from .memory import estimate, fitting_settings, model_sizes

        side = latent_side(self.recipe, self.base)
        args = (self.recipe.train, model_sizes(self.base, self.teachers, self.previous), side)
        found = estimate(*args)
        return {"estimate_bytes": found.total, "parts_bytes": found.parts, "summary": found.describe(),
                "fits": {f"{card} GB": answer for card, answer in fitting_settings(*args).items()}}

    def describe(self) -> dict:
        t = self.recipe.train
        return {
            "recipe": str(self.recipe_path), "name": self.recipe.name, "output": str(self.output),
            "base": {"ref": self.recipe.base, "folder": str(self.base),
                     "prediction_type": read_schedule(self.base).prediction_type},
            "teachers": [{"style": i, "name": tc.name, "ref": tc.ref,
                          "folder": str(f) if f else f"old style of {self.previous}",
                          "prediction_type": read_schedule(f or self.previous).prediction_type}
                         for i, (tc, f) in enumerate(zip(self.recipe.teachers, self.teachers))],
            "init_from": str(self.previous) if self.previous else None,
            "data": {"folder": self.recipe.data.folder, "images": self.data.images, "bytes": self.data.bytes,
                     "latent_cache_bytes": self.data.latent_bytes,
                     "synthesize": self.recipe.data.synthesize.model_dump() if self.recipe.data.synthesize else None},
            "train": t.model_dump(),
            "samples_per_teacher_per_step": t.batch_size * t.grad_accum / len(self.teachers),
            "memory": self.memory(),
            "resume_from": str(self.resume_from) if self.resume_from else None,
        }


def checkpoints(output: Path) -> list[Path]:
    return sorted((output / CHECKPOINTS).glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def _check_output(output: Path, recipe: Recipe, resume: bool, overwrite: bool) -> Path | None:
    run_file = output / RUN_FILE
    if output.exists() and not output.is_dir():
        raise BadInput(f"output {output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not run_file.is_file():
            raise BadInput(f"output {output}: exists and is not a dmm run; choose another --output or remove it")
        previous = json.loads(run_file.read_text())
        if previous.get("fingerprint") != recipe.fingerprint():
            raise BadInput(f"output {output}: holds a run of another recipe ({previous.get('name')!r}, different "
                           "base, teachers or data); choose another --output")
        started = bool(checkpoints(output)) or (output / "model_index.json").is_file()
        if started and not resume and not overwrite:
            raise BadInput(f"output {output}: already holds a run of this recipe; continue it with --resume or "
                           "start over with --overwrite")
    if resume:
        found = checkpoints(output) if output.is_dir() else []
        if found:
            return found[-1]
        if not run_file.is_file():
            raise BadInput(f"--resume: no checkpoint under {output / CHECKPOINTS}")
        console.say(f"distill: {output} has no checkpoint yet; starting from the beginning")
    return None


def _previous_student(recipe: Recipe) -> tuple[Path, StyleTable]:
    """The student an incremental recipe extends; its styles must lead the teachers list, in order."""
    folder = references.resolve(recipe.init_from)
    table = StyleTable.read(folder)
    if table is None:
        raise ModelError(f"init_from {recipe.init_from}: not a dmm student (no {STYLES_FILE})")
    names = [t.name for t in recipe.teachers]
    if names[:len(table.names)] != table.names:
        raise RecipeError(f"teachers: the first {len(table.names)} must be init_from's styles in order "
                          f"({', '.join(table.names)}), got ({', '.join(names[:len(table.names)])})")
    if len(names) == len(table.names):
        raise RecipeError(f"teachers: add at least one new teacher after init_from's {len(table.names)} styles")
    return folder, table


def _check_teachers(recipe: Recipe, base: Path, teachers: list[Path | None]) -> None:
    """Every teacher has the base's family, UNet and noise schedule; what they predict may differ (it is
    converted)."""
    check_pipeline_folder(base)
    family = model_family(base)
    for spec, folder in zip(recipe.teachers, teachers):
        own = model_family(folder) if folder is not None else family
        if own != family:
            raise ModelError(f"teacher {spec.name!r} ({spec.model}): an {own} model cannot be distilled with the "
                             f"{family} base {recipe.base}; every teacher must be a fine-tune of it")
    base_shapes = component_shapes(base / "unet")
    if any(k.startswith("class_embedding.") for k in base_shapes):
        raise ModelError(f"base {recipe.base}: is already a style student; a base must be a plain model")
    schedule = read_schedule(base)
    for spec, folder in zip(recipe.teachers, teachers):
        if folder is None:
            continue
        shapes = component_shapes(folder / "unet")
        for key in sorted(set(base_shapes) | set(shapes)):
            if base_shapes.get(key) != shapes.get(key):
                raise ModelError(f"teacher {spec.name!r} ({spec.model}): its UNet differs from the base's at {key} "
                                 f"(base {base_shapes.get(key)}, teacher {shapes.get(key)})")
        own = read_schedule(folder)
        if own.training != schedule.training:
            raise ModelError(f"teacher {spec.name!r} ({spec.model}): trained on another noise schedule ({own.describe()}) "
                             f"than the base ({schedule.describe()}), so its predictions cannot be matched")
        if own.prediction_type == "epsilon" != schedule.prediction_type and schedule.training[-1]:
            raise ModelError(f"teacher {spec.name!r} ({spec.model}): predicts epsilon, which does not convert to the "
                             "base's prediction at the zero-SNR last timestep of its schedule")


def plan_run(recipe_path: Path, overrides: list[str] = (), *, output: Path | None = None,
             max_steps: int | None = None, resume: bool = False, overwrite: bool = False) -> RunPlan:
    """Validate the recipe, the output folder, every model and the data; write nothing."""
    overrides = list(overrides) + ([f"train.max_steps={max_steps}"] if max_steps is not None else [])
    recipe = load_recipe(recipe_path, overrides)
    if resume and overwrite:
        raise BadInput("--resume and --overwrite contradict each other; pick one")
    out = Path(output or recipe.output)
    resume_from = _check_output(out, recipe, resume, overwrite)
    base = references.resolve(recipe.base)
    previous, table = _previous_student(recipe) if recipe.init_from else (None, None)
    old = len(table.names) if table else 0
    teachers = [None if i < old else references.resolve(t.model) for i, t in enumerate(recipe.teachers)]
    _check_teachers(recipe, base, teachers)  # before any LoRA is fetched
    teacher_loras = [lora.load_loras([lora.LoraSpec(x.model, x.scale) for x in t.loras], folder, t.model)
                     if folder is not None else [] for t, folder in zip(recipe.teachers, teachers)]
    for part in parts_besides_unet(base):  # the student folder gets copies of these: no link may lead out of the base
        check_links(base / part, model_root(base))
    _check_optimizer(recipe.train.optimizer)
    data = _plan_data(recipe, base, len(teachers))
    synth, prompts = recipe.data.synthesize, None
    if synth is not None:
        prompts = _synthesis_prompts(recipe, old)
    return RunPlan(recipe, Path(recipe_path), out, base, teachers, data, resume_from, overwrite, previous, table,
                   prompts, teacher_loras)


def _synthesis_prompts(recipe: Recipe, old_styles: int) -> list[str]:
    """data.synthesize's prompts, none of which may be an eval prompt for these teachers."""
    from ..data.prompts import read_prompts, shared_prompts

    given = recipe.data.synthesize.prompts
    prompts = read_prompts(Path(given) if given else None, [t.ref for t in recipe.teachers[old_styles:]],
                           "synthesis")
    eval_prompts = read_prompts(None, [t.ref for t in recipe.teachers], "eval")
    clash = shared_prompts(prompts, {prompt_digest(p) for p in eval_prompts})
    if clash:
        raise BadInput(f"data.synthesize.prompts {given or '(default)'}: {clash[0]!r} is an eval prompt for these "
                       f"teachers ({len(clash)} such prompts), and a student must not train on its teachers' "
                       "pictures of the prompts it is evaluated on; remove them")
    return prompts


def synthesis_settings(synth: Synthesize):
    """How the teachers draw synthesized data: seeds from SYNTHESIS_SEEDS up, which eval never uses."""
    from ..generate.samples import SamplerSettings

    return SamplerSettings(synth.steps, synth.guidance, SYNTHESIS_SEEDS + synth.seed)


def _check_optimizer(optimizer: str) -> None:
    if optimizer != "adamw-8bit":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise BadInput("train.optimizer adamw-8bit needs bitsandbytes: pip install 'dmm-cli[8bit]'") from None
    if not torch.cuda.is_available():
        raise BadInput("train.optimizer adamw-8bit runs on CUDA GPUs only; use adamw on this machine")


@dataclass
class DataPlan:
    images: int | None  # None: rows of Hub parquet shards, counted once they are downloaded
    bytes: int  # the pictures (or shards) on disk
    latent_bytes: int | None  # the latent cache they become


def _plan_data(recipe: Recipe, base: Path, teachers: int) -> DataPlan:
    """How many pictures the run trains on and the disk they take, without downloading a Hub dataset."""
    from ..data.hub_datasets import is_dataset_ref, list_dataset

    images, size, folder = 0, 0, recipe.data.folder
    if folder is not None and is_dataset_ref(folder):
        listing = list_dataset(folder)
        images, size = listing.images, listing.bytes
    elif folder is not None:
        found = open_images(resolve_data(folder), recipe.data.image_column, recipe.data.caption_column)
        images, size = len(found), found.size_bytes()
    if recipe.data.synthesize is not None and images is not None:
        images += recipe.data.synthesize.images_per_teacher * teachers
    side = latent_side(recipe, base)
    return DataPlan(images, size, None if images is None else images * 4 * side * side * 4)


def _downscaling(base: Path, part: str) -> int:
    """How many times smaller a VAE or UNet makes its input's sides: 2 per block after the first."""
    return 2 ** (len(json.loads((base / part / "config.json").read_text())["block_out_channels"]) - 1)


def latent_side(recipe: Recipe, base: Path) -> int:
    """The side of the run's latents: its picture side over the VAE's downscaling."""
    side = recipe.data.resolution or json.loads((base / "vae" / "config.json").read_text())["sample_size"]
    return side // _downscaling(base, "vae")


def bucket_multiple(base: Path) -> int:
    """What bucket sides must be multiples of: the VAE's downscaling times the UNet's."""
    return _downscaling(base, "vae") * _downscaling(base, "unet")


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
    from .trainer import MetricsLog, Trainer, load_models

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
                                       "recipe": shared_recipe(recipe)}, indent=2))
    models = load_models(recipe, plan.base, plan.teachers, accelerator.device, plan.previous)
    side = max((tuple(s.latents.shape[2:]) for s in sources), key=lambda hw: hw[0] * hw[1])  # costs the most
    if choose_attention(cfg.attention, accelerator.device, models.teacher_dtype, unet=models.student,
                        latent_size=side, batch=cfg.batch_size, backward=True) == "xformers":
        for unet in {id(u): u for u in [models.student, *models.teachers]}.values():
            unet.enable_xformers_memory_efficient_attention()
    trainer = Trainer(cfg, models, sources, tokenize(tokenizers, [""])[0], accelerator, plan.resume_from)
    start = trainer.step_done
    log = MetricsLog(out / "logs", start) if main else None
    if start:
        console.say(f"distill: resuming from {plan.resume_from} (step {start})")
    trainer.warm_up()
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
            raise DMMError(f"distill: the loss became non-finite (NaN or Inf) between steps {checked + 1} and {step}, "
                           f"so the run stopped ({f'its last good checkpoint is {kept[-1]}' if kept else 'no checkpoint was saved'}); "
                           "lower train.lr or check the teachers")
        checked = step

    try:
        while step < cfg.max_steps:
            with deferred():  # a Ctrl-C lands between steps, so a checkpoint never holds half a step
                losses = trainer.step(step)
                step += 1
            bar.update()
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                check_finite()
                now = time.perf_counter()
                done = step - (last["step"] if last else start)
                last = {"step": step, "loss": losses.loss.item(), "score_loss": losses.score.item(),
                        "feature_loss": losses.feature.item(), "lr": trainer.lr_schedule.get_last_lr()[0],
                        **({"adversarial_loss": losses.adversarial.item(),
                            "discriminator_loss": losses.discriminator.item()} if losses.adversarial is not None
                           else {}),
                        "samples_per_s": round(done * samples_per_step / max(now - tick, 1e-9), 2),
                        "processes": accelerator.num_processes}
                if accelerator.device.type == "cuda":
                    last["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                tick = now
                bar.set_postfix(loss=f"{last['loss']:.4f}", sps=last["samples_per_s"])
                if main:
                    log.write(last)
            if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                check_finite()
                with deferred():
                    _checkpoint(trainer, out, step, cfg.keep_checkpoints, main)
                accelerator.wait_for_everyone()
    except KeyboardInterrupt:
        bar.close()
        with deferred(reraise=False):  # a second Ctrl-C must not cost the first one's checkpoint
            check_finite()
            _checkpoint(trainer, out, step, cfg.keep_checkpoints, main)
        raise Interrupted(f"interrupted at step {step}; checkpoint saved in {out / CHECKPOINTS}; continue with "
                          "--resume") from None
    finally:
        bar.close()
        if log is not None:
            log.close()
    accelerator.wait_for_everyone()
    check_finite()
    if main:
        _checkpoint(trainer, out, step, cfg.keep_checkpoints, main)
        write_student(plan, trainer.unwrapped_student(), last or {"step": step})
        state.remember_last_model(out)
    accelerator.wait_for_everyone()
    return out


def data_sources(plan: RunPlan, tokenizers, device) -> list:
    """The run's training data as latents: the image folder, then (or only) each teacher's own generations."""
    from ..generate.samples import sample_set
    from ..models.devices import pick_dtype
    from ..models.pipeline import load_pipeline
    from ..models.styles import one_hot
    from .text import tokenize
    from .trainer import DataSource, load_vae

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
    if not main:
        return
    trainer.save_checkpoint(out / CHECKPOINTS / f"step-{step:07d}", step)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)


def write_student(plan: RunPlan, student, last: dict) -> None:
    """The run folder becomes a diffusers pipeline: student unet/, the base's other parts, styles.json, a card.

    Each part is replaced atomically; model_index.json goes last, so a folder with one is complete.
    """
    out, recipe = plan.output, plan.recipe
    dtype = torch.float32 if recipe.train.precision == "no" else torch.float16
    with atomic_folder(out / "unet") as tmp:
        student.to(dtype).save_pretrained(tmp, safe_serialization=True)
        student.to(torch.float32)
    for part in parts_besides_unet(plan.base):
        with atomic_folder(out / part) as tmp:
            copy_part(plan.base / part, tmp, model_root(plan.base))
    trained = read_schedule(plan.base)
    if read_schedule(out) != trained:  # the student samples with what it was trained to predict
        raise DMMError(f"{out / 'scheduler'}: does not match the base's scheduler the student was trained with")
    earlier = plan.previous_styles
    old = earlier.styles if earlier else []
    old = [Style(s.name, references.shareable(s.teacher), s.sha256, s.extra) for s in old]
    styles = old + [Style(t.name, references.shareable(t.ref), component_sha256(folder / "unet"))
                    for t, folder in zip(recipe.teachers[len(old):], plan.teachers[len(old):])]
    entry = {"recipe": recipe.name, "base": references.shareable(recipe.base), "steps": last.get("step"),
             "styles": [t.name for t in recipe.teachers], "prediction_type": trained.prediction_type}
    synth = recipe.data.synthesize
    if synth is not None:  # what eval must not measure this student on
        first = synthesis_settings(synth).seed
        entry["synthesis"] = {"prompts_sha256": sorted({prompt_digest(p) for p in plan.synthesis_prompts}),
                              "seeds": [first, first + synth.images_per_teacher]}
    if earlier:
        entry.update(init_from=references.shareable(recipe.init_from), new_styles=[s.name for s in styles[len(old):]],
                     old_style_fraction=recipe.train.old_style_fraction)
    table = StyleTable(styles, lineage=(earlier.lineage if earlier else []) + [entry])
    with atomic_file(out / STYLES_FILE) as tmp:
        tmp.write_text(table.to_json())
    with atomic_file(out / "README.md") as tmp:
        tmp.write_text(model_card(plan, last))
    with atomic_file(out / "model_index.json") as tmp:
        tmp.write_text(derived_model_index(plan.base))


def shared_recipe(recipe: Recipe) -> dict:
    """The recipe as files meant for sharing show it: every model, data folder and output by its reference or
    name (models.references.shareable), no path of this machine."""
    data = recipe.model_dump()
    data["base"], data["output"] = references.shareable(recipe.base), Path(recipe.output).name
    if recipe.init_from:
        data["init_from"] = references.shareable(recipe.init_from)
    for teacher in data["teachers"]:
        teacher["model"] = references.shareable(teacher["model"])
        for one in teacher["loras"]:
            one["model"] = references.shareable(one["model"])
    if recipe.data.folder:
        data["data"]["folder"] = references.shareable(recipe.data.folder)
    if recipe.data.synthesize and recipe.data.synthesize.prompts:
        data["data"]["synthesize"]["prompts"] = Path(recipe.data.synthesize.prompts).name
    return data


def model_card(plan: RunPlan, last: dict) -> str:
    recipe = plan.recipe
    rows = "\n".join(f"| {i} | {t.name} | `{references.shareable(t.ref)}` |" for i, t in enumerate(recipe.teachers))
    losses = ", ".join(f"{k} {last[k]:.5g}" for k in ("loss", "score_loss", "feature_loss") if k in last)
    first = recipe.teachers[0].name
    if model_family(plan.base) == "SDXL":
        loading = ("In Python, load it with `dmm_cli.models.pipeline.load_pipeline` (a `StableDiffusionXLPipeline` "
                   "whose UNet\nkeeps its style MLP in the `identity` class-embedding slot, which diffusers alone "
                   "leaves empty) and pass the\nstyle vector as the UNet's `class_labels` (see "
                   "`dmm_cli.generate.sampling.style_conditioning`),\nor bake a style into a plain SDXL model "
                   f"with `dmm export {plan.output.name} --style {first}`.")
    else:
        loading = ("In Python, load it with `StableDiffusionPipeline.from_pretrained` and pass the style vector as "
                   "the\nUNet's `class_labels` (see `dmm_cli.generate.sampling.style_conditioning`).")
    return f"""---
library_name: diffusers
tags: [stable-diffusion, dmm, model-merging, distillation]
---

# {recipe.name}: a DMM style-promptable student

Distilled with [dmm](https://arxiv.org/abs/2504.12364) from {len(recipe.teachers)} teachers into one UNet
that takes a style vector. Base: `{references.shareable(recipe.base)}`.

| style | name | teacher |
|---|---|---|
{rows}

Trained for {last.get("step", "?")} steps; final losses: {losses or "n/a"}.

## Generate

```bash
dmm generate --model {plan.output.name} --style {first} "a photo of a cat"
dmm generate --model {plan.output.name} --style all "a photo of a cat"
dmm generate --model {plan.output.name} --style {first}:0.5,{recipe.teachers[-1].name}:0.5 "a photo of a cat"
```

{loading}

## Recipe

```yaml
{yaml.safe_dump(shared_recipe(recipe), sort_keys=False).strip()}
```
"""
