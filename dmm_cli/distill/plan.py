"""`dmm distill`, first half: check the recipe, the output folder, every model and the data, and write nothing."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .. import console
from ..data.prompts import prompt_digest
from ..data.sources import open_images, resolve_data
from ..errors import BadInput, DMMError, ModelError, RecipeError
from ..files.hashing import component_sha256
from ..files.safetensors_header import component_shapes
from ..files.text import read_json
from ..generate.sampling import SYNTHESIS_SEEDS
from ..models import lora, references
from ..models.folders import (check_links, check_pipeline_folder, check_text_to_image, model_family, model_root,
                              parts_besides_unet, read_config)
from ..models.schedule import read_schedule
from ..models.styles import STYLES_FILE, StyleTable
from ..recipe import Recipe, Synthesize, load_recipe
from .checkpoint import damage


RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"


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
    processes: int = 1  # that the run is launched on (or, for a dry run, planned for)
    placement: str = "replicate"  # train.teacher_placement, auto resolved

    @property
    def sharded(self) -> bool:
        return self.recipe.train.student_sharding == "fsdp" and self.processes > 1

    def with_loras_fused(self) -> RunPlan:
        """The plan with each LoRA teacher's folder its fused copy, written once (not for a dry run)."""
        if not any(self.teacher_loras):
            return self
        return replace(self, teachers=[lora.fused_folder(t, own) if own else t
                                       for t, own in zip(self.teachers, self.teacher_loras)], teacher_loras=[])

    def memory(self) -> dict:
        """The peak GPU memory estimate of one process (distill/memory.py), the settings that fit common cards on
        this many processes, and the placement and sharding that fit them on 1, 2, 4 and 8."""
        from .memory import PROCESS_COUNTS, estimate, fitting_layouts, fitting_settings, model_sizes

        side = latent_side(self.recipe, self.base)
        train = self.recipe.train.model_copy(update={"teacher_placement": self.placement,
                                                     "student_sharding": "fsdp" if self.sharded else "none"})
        sizes = model_sizes(self.base, self.teachers, self.previous)
        found = estimate(train, sizes, side, self.processes)
        return {"estimate_bytes": found.total, "parts_bytes": found.parts, "summary": found.describe(),
                "trainable_parameters": found.trainable, "processes": self.processes,
                "teacher_placement": self.placement, "student_sharding": train.student_sharding,
                "fits": {f"{card} GB": answer for card, answer in
                         fitting_settings(train, sizes, side, self.processes).items()},
                "fits_by_processes": {str(n): {f"{card} GB": answer for card, answer in
                                               fitting_layouts(self.recipe.train, sizes, side, n).items()}
                                      for n in PROCESS_COUNTS}}

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
            "samples_per_teacher_per_step": t.batch_size * t.grad_accum * self.processes / len(self.teachers),
            "memory": self.memory(),
            "resume_from": str(self.resume_from) if self.resume_from else None,
        }


def plan_text(d: dict) -> str:
    """A plan's description (`RunPlan.describe()`) as the dry run prints it, a line per part."""
    t = d["train"]
    lines = [f"recipe {d['name']} ({d['recipe']}) -> {d['output']}",
             f"base   {d['base']['ref']}  [{d['base']['folder']}]  predicts {d['base']['prediction_type']}"]
    converted = [s["prediction_type"] != d["base"]["prediction_type"] for s in d["teachers"]]
    lines += [f"style {s['style']}: {s['name']:<12} {s['ref']}  [{s['folder']}]"
              + (f"  predicts {s['prediction_type']} (converted)" if other else "")
              for s, other in zip(d["teachers"], converted)]
    data = d["data"]
    images = "rows counted on download" if data["images"] is None else f"{data['images']} images"
    cache = "" if data["latent_cache_bytes"] is None else f", latent cache {data['latent_cache_bytes'] / 1e6:.1f} MB"
    lines.append(f"data   {images} from {data['folder'] or 'the teachers (synthesized)'}: "
                 f"{data['bytes'] / 1e6:.1f} MB on disk{cache}")
    feature = t["feature_loss"]
    lines.append(f"train  {t['max_steps']} steps x batch {t['batch_size']} x accum {t['grad_accum']}, lr {t['lr']}, "
                 f"precision {t['precision']}, feature loss {feature['weight']} x {feature['reduce']} of "
                 f"{feature['type']}, caption dropout {t['caption_dropout']}")
    student = t["student"]
    lines.append(f"student {student['type']}" + (f": rank {student['rank']} on {', '.join(student['targets'])}"
                                                  + "".join(f", {extra} whole" for extra in student["extras"])
                                                  if student["type"] == "lora" else "")
                 + f", {d['memory']['trainable_parameters']:,} UNet parameters train besides the style MLP")
    memory = d["memory"]
    n = memory["processes"]
    if n > 1:
        teachers = "sharded" if memory["teacher_placement"] == "shard" else "replicated"
        lines.append(f"layout {n} processes: teachers {teachers}, student "
                     + ("sharded (fsdp)" if memory["student_sharding"] == "fsdp" else "replicated"))
    lines.append(f"memory {memory['summary']}")
    lines += [f"       on {card}: {answer}" for card, answer in memory["fits"].items()]
    lines.append("fits   by GPU count (placement, sharding, then thriftier settings):")
    for count, answers in memory["fits_by_processes"].items():
        lines += [f"       {count} x {card}: {answer}" for card, answer in answers.items()]
    if d["resume_from"]:
        lines.append(f"resume {d['resume_from']}")
    return "\n".join(lines)


def checkpoints(output: Path) -> list[Path]:
    return sorted((output / CHECKPOINTS).glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def _check_output(output: Path, recipe: Recipe, resume: bool, overwrite: bool) -> Path | None:
    run_file = output / RUN_FILE
    if output.exists() and not output.is_dir():
        raise BadInput(f"output {output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not run_file.is_file():
            raise BadInput(f"output {output}: exists and is not a dmm run; choose another --output or remove it")
        try:
            previous = read_config(run_file)
        except ModelError:
            if overwrite:
                return None
            raise BadInput(f"{run_file}: damaged (not a JSON object), so the run cannot be checked against this "
                           "recipe; start over with --overwrite")
        if previous.get("fingerprint") != recipe.fingerprint():
            raise BadInput(f"output {output}: holds a run of another recipe ({previous.get('name')!r}, different "
                           "base, teachers or data); choose another --output")
        started = bool(checkpoints(output)) or (output / "model_index.json").is_file()
        if started and not resume and not overwrite:
            raise BadInput(f"output {output}: already holds a run of this recipe; continue it with --resume or "
                           "start over with --overwrite")
        if started and resume:
            _warn_changed_training(previous.get("recipe", {}).get("train", {}), recipe)
    if resume:
        found = checkpoints(output) if output.is_dir() else []
        for newest in reversed(found):
            why = damage(newest)
            if why is None:
                return newest
            console.warn(f"--resume: checkpoint {newest} is damaged ({why}); trying the one before")
        if found:
            raise BadInput(f"--resume: every checkpoint under {output / CHECKPOINTS} is damaged; start over with "
                           "--overwrite")
        if not run_file.is_file():
            raise BadInput(f"--resume: no checkpoint under {output / CHECKPOINTS}")
        console.say(f"distill: {output} has no checkpoint yet; starting from the beginning")
    return None


# What a resumed run may change without being told: how long it runs and how often it logs and saves.
_RESUME_FREELY = {"max_steps", "log_every", "checkpoint_every"}


def _warn_changed_training(before: dict, recipe: Recipe) -> None:
    """A resume with other train settings than the last start's goes on with them; say which, once."""
    def flat(d: dict, prefix: str = "train.") -> dict:
        out = {}
        for key, value in d.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    old, new = flat(before), flat(recipe.train.model_dump(mode="json"))
    changed = [f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) and k.removeprefix("train.") not in _RESUME_FREELY]
    if changed and before and os.environ.get("RANK", "0") == "0":  # once, not by every process of a launch
        console.warn(f"distill: resuming with train settings changed since the last start ({', '.join(changed)}); "
                     "the run goes on with them, so it no longer matches one uninterrupted run")


def _resolved(ref: str, field: str) -> Path:
    """A recipe's model, its failure naming the recipe field it came from."""
    try:
        return references.resolve(ref)
    except ModelError as e:
        raise ModelError(f"{field}: {e}") from None


def _previous_student(recipe: Recipe) -> tuple[Path, StyleTable]:
    """The student an incremental recipe extends; its styles must lead the teachers list, in order."""
    folder = _resolved(recipe.init_from, "init_from")
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
    check_text_to_image(base)  # the teachers must share its UNet's shapes
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
    synth = recipe.data.synthesize
    if synth is not None and synth.steps > schedule.num_train_timesteps:
        raise RecipeError(f"data.synthesize.steps: {synth.steps} is more than the {schedule.num_train_timesteps} "
                          f"timesteps the base {recipe.base} was trained on")
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


def _check_student(recipe: Recipe, base: Path, previous: Path | None) -> None:
    """A LoRA student's targets each name some layer of the base; an incremental run keeps the student's kind, and
    a LoRA student's adapter and base."""
    from ..models import lora_student

    spec = recipe.train.student
    if spec.type == "lora":
        layers = lora_student.layer_names(component_shapes(base / "unet"))
        for target in spec.targets:
            if not any(lora_student.matches(layer, target) for layer in layers):
                raise RecipeError(f"train.student.targets: {target!r} matches no Linear or Conv layer of the base's "
                                  "UNet (names such as to_q, ff.net.2 or down_blocks.0.resnets.0.conv1)")
    if previous is None:
        return
    was_lora = lora_student.is_lora_student(previous)
    if was_lora != (spec.type == "lora"):
        kind = "a LoRA student" if was_lora else "a full student"
        raise RecipeError(f"train.student.type {spec.type}: init_from {recipe.init_from} is {kind}, and a student "
                          f"grows as the kind it is; set train.student.type to {'lora' if was_lora else 'full'}")
    if was_lora:
        config, _ = lora_student.read_adapter(previous)
        if config["dmm"]["base_unet_sha256"] != component_sha256(base / "unet"):
            raise RecipeError(f"base {recipe.base}: is not the base init_from {recipe.init_from}'s adapter was "
                              "trained on")
        theirs = (int(config["r"]), float(config["lora_alpha"]), sorted(config["target_modules"]),
                  sorted(config["dmm"].get("extras", [])))
        ours = (spec.rank, float(spec.alpha or spec.rank), sorted(spec.targets), spec.extras)
        if theirs != ours:
            raise RecipeError(f"train.student: rank, alpha, targets and extras must be init_from's adapter's "
                              f"(rank {theirs[0]}, alpha {theirs[1]:g}, targets {', '.join(theirs[2])}, extras "
                              f"{', '.join(theirs[3]) or 'none'})")


def plan_run(recipe_path: Path, overrides: list[str] = (), *, output: Path | None = None,
             max_steps: int | None = None, resume: bool = False, overwrite: bool = False,
             processes: int | None = None) -> RunPlan:
    """Validate the recipe, the output folder, every model and the data; write nothing. `processes`: those the
    run will have (default: the launcher's WORLD_SIZE, or 1)."""
    overrides = list(overrides) + ([f"train.max_steps={max_steps}"] if max_steps is not None else [])
    recipe = load_recipe(recipe_path, overrides)
    if resume and overwrite:
        raise BadInput("--resume and --overwrite contradict each other; pick one")
    out = Path(output or recipe.output)
    resume_from = _check_output(out, recipe, resume, overwrite)
    if lora.split_ref(recipe.base)[1]:
        raise RecipeError(f"base {recipe.base}: a base with LoRAs is not read here; fuse them into a folder once "
                          f"with `dmm fetch {recipe.base}` and make that the base")
    base = _resolved(recipe.base, "base")
    previous, table = _previous_student(recipe) if recipe.init_from else (None, None)
    old = len(table.names) if table else 0
    # A teacher's LoRAs: inline in its model (`MODEL+LORA:SCALE`, as every command takes it), then its `loras`.
    split = [lora.split_ref(t.model) for t in recipe.teachers]
    teachers = [None if i < old else _resolved(model, f"teacher {t.name!r}")
                for i, ((model, _), t) in enumerate(zip(split, recipe.teachers))]
    _check_teachers(recipe, base, teachers)  # before any LoRA is fetched
    _check_student(recipe, base, previous)
    teacher_loras = [lora.load_loras(inline + [lora.LoraSpec(x.model, x.scale) for x in t.loras], folder, model)
                     if folder is not None else []
                     for t, (model, inline), folder in zip(recipe.teachers, split, teachers)]
    for part in parts_besides_unet(base):  # the student folder gets copies of these: no link may lead out of the base
        check_links(base / part, model_root(base))
    _check_optimizer(recipe.train.optimizer)
    data = _plan_data(recipe, base, len(teachers))
    synth, prompts = recipe.data.synthesize, None
    if synth is not None:
        prompts = _synthesis_prompts(recipe, old)
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    plan = RunPlan(recipe, Path(recipe_path), out, base, teachers, data, resume_from, overwrite, previous, table,
                   prompts, teacher_loras, processes)
    return replace(plan, placement=_check_layout(plan))


def _check_layout(plan: RunPlan) -> str:
    """train.teacher_placement (auto resolved: returned) and train.student_sharding, checked against the number
    of processes, the student, and the checkpoint a resume continues."""
    from .placement import LAYOUT_FILE, resolve

    t, n, teachers = plan.recipe.train, plan.processes, len(plan.teachers)
    replicate_fits = True
    if t.teacher_placement == "auto" and n > 1 and torch.cuda.is_available():
        from .memory import estimate, model_sizes

        trial = t.model_copy(update={"teacher_placement": "replicate"})
        sizes = model_sizes(plan.base, plan.teachers, plan.previous)
        found = estimate(trial, sizes, latent_side(plan.recipe, plan.base), n)
        replicate_fits = found.total <= torch.cuda.get_device_properties(0).total_memory
    placement = resolve(t.teacher_placement, teachers, n, replicate_fits)
    if placement == "shard":
        if n > teachers:
            raise RecipeError(f"train.teacher_placement shard: {n} processes but {teachers} teachers, and each "
                              "process must hold at least one; use replicate, or at most as many processes")
        if t.batch_size * n < teachers:
            raise RecipeError(f"train.teacher_placement shard: a step's batch (batch_size {t.batch_size} x {n} "
                              f"processes) must hold a sample of each of the {teachers} teachers")
        if plan.previous is not None and t.old_style_fraction == 0:
            raise RecipeError("train.teacher_placement shard: with old_style_fraction 0 the old styles get no "
                              "samples, so their process would have none; use replicate")
    if t.student_sharding == "fsdp":
        if t.student.type == "lora":
            raise RecipeError("train.student_sharding fsdp: a LoRA student's trained weights are small and its "
                              "base is frozen; use none")
        if t.precision == "fp16" or t.optimizer == "adamw-8bit":
            raise RecipeError(f"train.student_sharding fsdp: trains in bf16 or fp32 with adamw, not with "
                              f"{'precision fp16' if t.precision == 'fp16' else 'optimizer adamw-8bit'}")
        if n == 1:
            console.say("distill: train.student_sharding fsdp on one process: the student trains unsharded")
    if plan.resume_from is not None and (plan.resume_from / LAYOUT_FILE).is_file():
        was = read_json(plan.resume_from / LAYOUT_FILE)
        now = {"teacher_placement": placement, "student_sharding": "fsdp" if plan.sharded else "none"}
        for key, value in now.items():
            if was[key] != value:
                raise BadInput(f"--resume: {plan.resume_from} was trained with train.{key} {was[key]}, and this run "
                               f"would train with {value} on {n} process{'es' * (n > 1)}; resume it as it was "
                               "trained")
    return placement


def _synthesis_prompts(recipe: Recipe, old_styles: int) -> list[str]:
    """data.synthesize's prompts, none of which may be an eval prompt for these teachers."""
    from ..data.prompts import read_prompts, shared_prompts

    given = recipe.data.synthesize.prompts
    prompts = read_prompts(Path(given) if given else None, [t.ref for t in recipe.teachers[old_styles:]],
                           "synthesis", "data.synthesize.prompts")
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
    """What adamw-8bit needs is the machine's to give: without it, the environment fails (exit 1), as for a device."""
    if optimizer != "adamw-8bit":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DMMError("train.optimizer adamw-8bit needs bitsandbytes: pip install 'dmm-cli[8bit]'") from None
    if not torch.cuda.is_available():
        raise DMMError("train.optimizer adamw-8bit runs on CUDA GPUs only; use adamw on this machine")


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
    return 2 ** (len(read_json(base / part / "config.json")["block_out_channels"]) - 1)


def latent_side(recipe: Recipe, base: Path) -> int:
    """The side of the run's latents: its picture side over the VAE's downscaling."""
    side = recipe.data.resolution or read_json(base / "vae" / "config.json")["sample_size"]
    return side // _downscaling(base, "vae")


def bucket_multiple(base: Path) -> int:
    """What bucket sides must be multiples of: the VAE's downscaling times the UNet's."""
    return _downscaling(base, "vae") * _downscaling(base, "unet")
