"""Distillation recipes: a YAML file validated by a pydantic schema; every error names file and field path."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError


class Strict(BaseModel):
    # inf or nan passes every bound (`lr: .inf` is > 0) and would only show up as a NaN loss hours later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraRef(Strict):
    model: str = Field(min_length=1, description="LoRA reference: a kohya/A1111 file, a diffusers/PEFT folder, a Hub "
                                                 "repo org/name[@rev][/file.safetensors], or toy:<style>-lora.")
    scale: float = Field(1.0, ge=0, description="Its strength, as in A1111's <lora:name:0.8>.")


class Teacher(Strict):
    name: str = Field(min_length=1, description="Style name, used by `dmm generate --style NAME`.")
    model: str = Field(min_length=1, description="Model reference: Hub id, local folder, or toy:<name>.")
    loras: list[LoraRef] = Field([], description="LoRAs fused into the model: the teacher is the model with them.")

    @property
    def ref(self) -> str:
        """The teacher as one reference, `MODEL+LORA:SCALE+...`, as every command reads it."""
        return self.model + "".join(f"+{lora.model}:{lora.scale!r}" for lora in self.loras)


class FeatureLoss(Strict):
    """λ_feat × (the mean, or sum, over the 9 tapped blocks of each block's loss). The released code applies 0.002
    to the mean, which is these defaults; the paper writes λ_feat = 0.001 over a sum, 0.009 on the mean."""

    weight: float = Field(0.002, ge=0, description="λ_feat.")
    reduce: Literal["mean", "sum"] = Field("mean", description="How the per-block losses combine.")
    type: Literal["l2", "cos"] = Field("l2", description="l2: mean squared error; cos: 1 - cosine similarity over "
                                                         "channels at each pixel, as released.")


class Synthesize(Strict):
    """Distill on each teacher's own generations (paper §4.2, stage 2), cached like eval samples."""

    images_per_teacher: int = Field(ge=1, le=1_000_000)
    prompts: Optional[str] = Field(None, description="One prompt per line, none of them an eval prompt; default: "
                                                     "the toy training captions for toy teachers, else the shipped "
                                                     "synthesis prompts (600).")
    after_step: int = Field(0, ge=0, description="Train on data.folder until this step, then on the generations.")
    steps: int = Field(25, ge=1, description="Sampling steps for the generations.")
    guidance: float = Field(7.5, ge=0)
    seed: int = Field(0, ge=0, le=2**61, description="Picture k takes seed 2**62 + seed + k, a range eval never uses.")


class Data(Strict):
    folder: Optional[str] = Field(None, description="Captioned pictures: a folder (metadata.jsonl, .txt sidecars or "
                                                    "parquet shards), a Hub dataset datasets/ORG/NAME[@rev], or a "
                                                    "plug-in's image set (toy:shapes).")
    image_column: str = Field("image", min_length=1, description="Parquet shards' picture column.")
    caption_column: str = Field("text", min_length=1, description="Parquet shards' caption column.")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="Share of pictures that may fail to decode "
                                                                  "(they are skipped) before the run stops.")
    resolution: Optional[int] = Field(None, gt=0, description="Training resolution; default: the base's.")
    buckets: bool = Field(False, description="Aspect-ratio buckets for data.folder: each picture is cropped to the "
                                             "shape of about resolution² pixels nearest its own (1:2 to 2:1), as "
                                             "SDXL fine-tunes are trained, and each micro-batch comes from one "
                                             "shape; otherwise pictures are centre-cropped square.")
    synthesize: Optional[Synthesize] = None

    @model_validator(mode="after")
    def _some_data(self):
        if self.folder is None and self.synthesize is None:
            raise ValueError("needs a folder, synthesize, or both")
        if self.synthesize is not None and self.synthesize.after_step and self.folder is None:
            raise ValueError("synthesize.after_step needs a folder to train on first")
        if self.buckets and self.folder is None:
            raise ValueError("buckets sort the pictures of a folder, and this recipe has none")
        return self

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v):
        if v is not None and v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v})")
        return v


class Adversarial(Strict):
    """Multi-class adversarial loss (paper Eq. 11-12): a 2N-class discriminator on re-noised x̂0 estimates."""

    weight: float = Field(0.01, ge=0, description="λ_adv; the paper uses 0.01.")
    lr: float = Field(1e-5, gt=0, description="Discriminator learning rate.")
    start_step: int = Field(0, ge=0, description="First step with the adversarial terms.")


# Every attention projection and feed-forward layer of the transformer blocks, as most style LoRAs train.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


class Student(Strict):
    """What trains: every weight of the student, or a LoRA on its frozen base (with the style MLP)."""

    type: Literal["full", "lora"] = Field("full", description="full: every UNet weight trains; lora: a low-rank "
                                          "adapter on a frozen base, a few percent of the optimizer state.")
    rank: int = Field(16, gt=0, description="lora: the adapter's rank.")
    alpha: Optional[float] = Field(None, gt=0, description="lora: its scale is alpha/rank; default: the rank.")
    targets: list[str] = Field(list(LORA_TARGETS), min_length=1, description="lora: the layers it adapts, by "
                               "name or last dotted parts of the name (resnets' conv1/conv2 add conv layers).")
    extras: list[Literal["norms", "biases"]] = Field([], description="lora: also train these whole, in fp32: the "
                                                     "norm layers' scales and shifts, every bias. Exported as LyCORIS "
                                                     "w_norm/b_norm and kohya diff_b keys (--format lora only).")

    @field_validator("extras")
    @classmethod
    def _once_each(cls, v):
        return sorted(set(v))


class Timesteps(Strict):
    """How each sample's training timestep is drawn."""

    sampling: Literal["uniform", "logit_normal"] = Field("uniform", description="uniform over the schedule, or "
                                                          "logit-normal in t/T, which favours the middle of it.")
    mean: float = Field(0.0, description="logit_normal: the centre in logits of t/T; below 0 favours less noise.")
    std: float = Field(1.0, gt=0, description="logit_normal: the spread in logits.")


class Ema(Strict):
    """An exponential moving average of the student's weights, which becomes the saved student."""

    decay: float = Field(0.999, description="Weight of the average so far at each step; between 0 and 1, exclusive.")
    start_step: int = Field(0, ge=0, description="Steps before this one copy the weights instead of averaging them.")

    @field_validator("decay")
    @classmethod
    def _open_interval(cls, v):
        if not 0 < v < 1:
            raise ValueError(f"must be between 0 and 1, exclusive (got {v})")
        return v


class Train(Strict):
    max_steps: int = Field(1000, gt=0)
    batch_size: int = Field(16, gt=0, description="Per process; each step's batch is split across the teachers.")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="After the warm-up: keep "
                                                                  "train.lr, or decay it to 0 at max_steps along a "
                                                                  "cosine or a straight line.")
    ema: Optional[Ema] = None
    timesteps: Timesteps = Timesteps()
    student: Student = Student()
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = Field(0, ge=0)
    feature_loss: FeatureLoss = FeatureLoss()
    caption_dropout: float = Field(0.1, ge=0, le=1, description="Same drop for student and teacher prompts.")
    checkpoint_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(50, gt=0)
    attention: Literal["auto", "sdpa", "flash", "cudnn", "efficient", "xformers"] = Field(
        "auto", description="auto: on CUDA, the fastest kernel on the student's own attention shapes (timed once, "
                            "remembered); sdpa: PyTorch's own pick; or one SDPA kernel, or xformers.")
    compile: Union[Literal["auto"], bool] = Field("auto", description="torch.compile the UNets' repeated blocks "
                                                  "(static shapes, cached under $DMM_HOME/compile); auto: on CUDA only.")
    compile_budget_s: float = Field(600, gt=0, description="Past this many seconds of compiling, train without it.")
    cuda_graphs: Union[Literal["auto"], bool] = Field("auto", description="Replay each teacher's forward as a CUDA "
                                                      "graph, so a step's host time does not grow with the number of "
                                                      "teachers; auto: on CUDA.")
    teacher_offload: Literal["none", "cpu"] = Field("none", description="cpu: keep teachers in pinned host memory "
                                                                        "and stream each in when used.")
    teacher_placement: Literal["auto", "replicate", "shard"] = Field(
        "auto", description="With several processes: replicate every teacher on each, or shard them (each holds "
                            "its share and trains on their samples; same training either way); auto: shard when "
                            "they split evenly or replicating does not fit the card.")
    student_sharding: Literal["none", "fsdp"] = Field("none", description="fsdp: shard the student's weights, "
                                                      "gradients and optimizer state over the processes (FSDP2); "
                                                      "on one process it trains unsharded.")
    gradient_checkpointing: bool = Field(False, description="Recompute the student's activations in the backward "
                                                            "pass: far less memory, about a third more time.")
    optimizer: Literal["adamw", "adamw-8bit"] = Field("adamw", description="adamw-8bit: bitsandbytes' 8-bit AdamW "
                                                                           "(the 8bit extra, CUDA only).")
    adversarial_loss: Optional[Adversarial] = None
    old_style_fraction: Optional[float] = Field(None, ge=0, le=1, description="With init_from: share of each batch "
                                                "for the old styles (0 = no regulariser); default proportional.")
    new_style_init: Literal["mean", "zero", "random"] = Field("mean", description="With init_from: how the new "
                                                                                  "styles' inputs start.")
    style_init: Literal["zero", "random"] = Field("zero", description="The style embedding's last layer: zero (the "
                                                                      "student starts as its base exactly) or "
                                                                      "random, as the released code does.")

    @field_validator("precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML reads a bare `no` as false

    @model_validator(mode="after")
    def _within_the_run(self):
        if self.lr_schedule != "constant" and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps}), so the "
                             f"{self.lr_schedule} schedule would never decay")
        if self.ema is not None and self.ema.start_step >= self.max_steps:
            raise ValueError(f"ema.start_step ({self.ema.start_step}) is not before max_steps ({self.max_steps}), so no "
                             "step would be averaged")
        return self


class Recipe(Strict):
    name: str = Field(min_length=1)
    base: str = Field(min_length=1, description="The model all teachers were fine-tuned from.")
    teachers: list[Teacher]
    data: Data
    train: Train = Train()
    output: str = Field(min_length=1, description="Run folder; the final student is written here.")
    init_from: Optional[str] = Field(None, description="A dmm student to extend with new teachers (incremental "
                                                        "merging); its styles must lead the teachers list.")

    @field_validator("teachers")
    @classmethod
    def _teachers(cls, v):
        if not v:
            raise ValueError("needs at least one teacher")
        seen = set()
        for t in v:
            if t.name in seen:
                raise ValueError(f"duplicate style name {t.name!r}")
            seen.add(t.name)
        return v

    @model_validator(mode="after")
    def _names_are_not_indices(self):
        for t in self.teachers:
            if t.name.isdigit() or t.name == "all" or any(c in t.name for c in ":,"):
                raise ValueError(f"teacher name {t.name!r} would be ambiguous in --style (no digits-only, "
                                 "`all`, ':' or ',')")
        return self

    def fingerprint(self) -> str:
        """Identifies the run's model: base, teachers and data (not step counts or logging)."""
        key = {"base": self.base, "teachers": [{"name": t.name, "model": t.ref} for t in self.teachers],
               "data": self.data.model_dump()}
        if self.init_from:
            key["init_from"] = self.init_from
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _location(loc: tuple) -> str:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts[-1] = f"{parts[-1]}[{p}]" if parts else f"[{p}]"
        else:
            parts.append(str(p))
    return ".".join(parts) or "(top level)"


_BOUNDS = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
           "less_than_equal": "<= {le}"}
_TYPES = {"int_parsing": "an integer", "int_type": "an integer", "int_from_float": "a whole number",
          "float_parsing": "a number", "float_type": "a number", "finite_number": "a finite number",
          "string_type": "a string", "bool_parsing": "true or false", "bool_type": "true or false",
          "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping"}


def _message(err: dict) -> str:
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "is required"
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ")
    if kind in _BOUNDS:
        text = "must be " + _BOUNDS[kind].format(**{k: f"{v:g}" for k, v in ctx.items()})
    elif kind in _TYPES:
        text = "must be " + _TYPES[kind]
    elif kind == "literal_error":
        text = "must be one of " + ctx.get("expected", "")
    elif kind == "string_too_short":
        text = "must not be empty"
    else:
        text = err["msg"]
    shown = repr(got)
    return f"{text} (got {shown if len(shown) <= 60 else shown[:57] + '...'})"


def _first_error(errors: list[dict]) -> str:
    """`field: what is wrong` for the first failing field. A field of several kinds (compile: 'auto' or true or
    false) fails once per kind, its loc ending in the kind's tag: those are said as one."""
    def field(err: dict) -> tuple:
        loc = err["loc"]
        return loc[:-1] if err["type"] in _UNION_TAGGED and len(loc) > 1 and _is_tag(loc[-1]) else loc

    first = errors[0]
    kinds = [err for err in errors if field(err) == field(first)]
    if len(kinds) == 1:
        return f"{_location(first['loc'])}: {_message(first)}"
    wanted = " or ".join(_message(err).removeprefix("must be ").removeprefix("one of ").split(" (got ")[0]
                         for err in kinds)
    return f"{_location(field(first))}: must be {wanted} (got {first.get('input')!r:.60})"


_UNION_TAGGED = {"literal_error", *_TYPES}


def _is_tag(part) -> bool:
    return isinstance(part, str) and (part in ("bool", "int", "float", "str") or part.startswith("literal["))


class _UniqueKeysLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: YAML forbids it, and PyYAML lets the last one win
    without a word. Keys merged in with `<<` may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        problem=f"the key {key_node.value!r} is given twice", problem_mark=key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeysLoader)  # a SafeLoader: plain data only


def set_override(data: dict, assignment: str, source: str) -> tuple[str, ...]:
    """Apply one `--set a.b.c=value` (value parsed as YAML) to the raw recipe dict; returns the key path it set."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path:
        raise RecipeError(f"--set {assignment!r}: expected key.path=value")
    try:
        value = _load_yaml(raw)
    except yaml.YAMLError:
        value = raw
    keys = path.split(".")
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"{source}: --set {path}: {k} is not a section")
        node = child
    node[keys[-1]] = value
    return tuple(keys)


MAX_BYTES = 1 << 20
MAX_NODES = 10_000  # after expanding YAML aliases: a recipe is a few dozen values, an alias bomb billions
MAX_DEPTH = 32


def _expanded_size(node, depth: int = 0, busy: frozenset = frozenset(), memo: dict | None = None) -> int:
    """How many values `node` holds once its aliases are expanded; stops early past the limits."""
    memo = {} if memo is None else memo
    if not isinstance(node, (dict, list)):
        return 1
    if id(node) in busy or depth > MAX_DEPTH:
        return MAX_NODES + 1  # a cycle, or nested too deep
    if id(node) not in memo:
        total = 1
        for child in (node.values() if isinstance(node, dict) else node):
            total += _expanded_size(child, depth + 1, busy | {id(node)}, memo)
            if total > MAX_NODES:
                break
        memo[id(node)] = total
    return memo[id(node)]


def load_recipe(path: Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raises RecipeError naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: {'a folder, not a' if path.is_dir() else 'no such'} recipe file")
    if path.stat().st_size > MAX_BYTES:
        raise RecipeError(f"{path}: {path.stat().st_size} bytes is too large for a recipe (at most {MAX_BYTES})")
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: malformed YAML at {where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    except RecursionError:  # the YAML parser recurses once per nested bracket
        raise RecipeError(f"{path}: nested too deeply to be a recipe (at most {MAX_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of keys to values")
    if _expanded_size(data) > MAX_NODES:
        raise RecipeError(f"{path}: too large or too deeply nested once its YAML aliases are expanded (at most "
                          f"{MAX_NODES} values, {MAX_DEPTH} levels)")
    overridden = [set_override(data, assignment, str(path)) for assignment in overrides]
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        loc = tuple(str(part) for part in e.errors()[0]["loc"])
        source = "--set" if any(loc[:len(keys)] == keys for keys in overridden) else f"{path}:"
        raise RecipeError(f"{source} {_first_error(e.errors())}") from None
