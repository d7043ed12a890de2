"""An estimate of a run's peak GPU memory, before anything is loaded, and the settings that would fit a card.

    student weights    4 B x P            (fp32 master weights, whatever train.precision says)
    optimizer state    8 B x P for AdamW, 2 B x P for 8-bit AdamW (two moments)
    EMA                4 B x P with train.ema (an fp32 average of the student's weights)
                       (a LoRA student: P is its adapter's weights, and its frozen base takes b x the UNet's)
    teachers           b x P x distinct teacher UNets   (b = 2 B in bf16/fp16, 4 B in fp32; one slot with
                                                          train.teacher_offload: cpu)
    text encoders      b x their parameters, once per distinct encoder
    discriminator      b x the UNet's encoder half, with train.adversarial_loss
    activations        every storage the student's forward saves for its backward, counted once, in the dtype
                       CUDA autocast gives it (half-precision matmul inputs and weight copies, float32 norms),
                       with attention as the fused kernels keep it; with gradient checkpointing, the regions'
                       inputs plus one region recomputed at a time. Counted on meta tensors: no memory used.
    gradients          4 B x P, where they outgrow the activations (the peak is at the end of the forward)
    + 10 % for the allocator and workspaces.

Per process, on W processes (distill/placement.py): with train.teacher_placement shard a process holds only its
teachers (the busiest: the most distinct UNets) and trains on their samples (the most any process gets); with
train.student_sharding fsdp the student's weights, gradients, optimizer state and EMA are split W ways, and
the unsharded parts are gathered whole in the training dtype: the UNet outside its repeated blocks for the
whole step, and two blocks at a time (one computing, one prefetched); as they arrive in half precision,
autocast keeps no half-precision copies of them (the activations' fixed part).

P is the UNet's parameter count, read from its weights files' headers. The estimate leaves out the
latent and text-context caches (at most 2 GB and 1 GB, kept on the GPU only when they fit).
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
from torch.nn import functional as F

from ..files.hashing import component_sha256
from ..files.safetensors_header import component_shapes
from ..files.text import read_json
from ..models.lora_student import adapter_parameters

CARDS_GB = (24, 48, 80)
PROCESS_COUNTS = (1, 2, 4, 8)
_BLOCK = re.compile(r"^(.*\.(?:attentions|resnets)\.\d+)\.")  # a repeated block's weights: its FSDP unit
ENCODER_PARTS = ("text_encoder", "text_encoder_2")  # an SDXL model has both


def parameters(component: Path) -> int:
    total = 0
    for shape in component_shapes(component).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


@dataclass(frozen=True)
class Activations:
    """What the student's forward leaves for its backward: `per_sample` bytes a sample, `fixed` bytes whatever
    the batch (autocast's half-precision copies of the weights, which the matmuls keep), and `transient`: what
    gradient checkpointing recomputes, one region at a time, during the backward (per sample)."""

    per_sample: int
    fixed: int
    transient: int = 0

    def at(self, batch: int) -> int:
        return self.fixed + (self.per_sample + self.transient) * batch


@functools.cache
def activation_bytes(unet_config: Path, side: int, precision: str, checkpointing: bool = False,
                     lora: tuple | None = None) -> Activations:
    """Counted by running the UNet on meta tensors (no memory, no arithmetic) on one sample: every storage
    autograd saves, once however many ops save it, in the dtype CUDA autocast gives it. Each of those has the
    batch as its first dimension, since autograd saves only what descends from the inputs or is an input, so
    they scale with the batch; autocast's weight copies do not. With `lora` (rank, targets), the UNet is a LoRA
    student's: a frozen base, so only what the adapter's gradients need."""
    per_sample, copies, region = _saved(unet_config, side, precision, checkpointing, lora)
    return Activations(per_sample, copies, region)


def _saved(unet_config: Path, side: int, precision: str, checkpointing: bool, lora: tuple | None,
           batch: int = 1) -> tuple[int, int, int]:
    """(bytes kept until the backward, bytes of autocast's weight copies, the largest checkpointed region's
    bytes) of one forward on `batch` samples."""
    from ..models.meta import meta_inputs, meta_unet

    low = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    unet = meta_unet(read_json(unet_config)).train()
    if lora is not None:
        from peft import LoraConfig, inject_adapter_in_model

        torch.nn.Module.to(unet.requires_grad_(False), low or torch.float32)  # (diffusers' own .to() warns)
        with torch.device("meta"):
            inject_adapter_in_model(LoraConfig(r=lora[0], target_modules=list(lora[1])), unet)
    args, kwargs = meta_inputs(unet, batch, side, side)
    kept, copies, regions = {}, {}, [0]
    # storages counted apart: the weights, and autocast's half-precision copies of them (the fixed part)
    counted_apart = {p.untyped_storage()._cdata for p in unet.parameters()}

    def keeper(into: dict, hold: bool):
        """Notes each storage by address, with its tensor: held (what the run itself holds), or weakly, so that
        a save whose graph node is dropped at once (its output unused) is not counted."""
        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage._cdata not in counted_apart:
                into.setdefault(storage._cdata, []).append(
                    (tensor if hold else weakref.ref(tensor), storage.nbytes()))
            return tensor
        return pack

    def weight_copy(tensor):
        """Held, as autocast holds it until it exits: its address stays this copy's."""
        copies[tensor.untyped_storage()._cdata] = tensor
        counted_apart.add(tensor.untyped_storage()._cdata)
        return tensor

    def alive(notes: dict) -> dict[int, int]:
        """Address -> bytes of the storages still alive (an address freed and reused counts once)."""
        found = {}
        for address, entries in notes.items():
            sizes = [n for ref, n in entries if isinstance(ref, torch.Tensor) or ref() is not None]
            if sizes:
                found[address] = max(sizes)
        return found

    def checkpoint(module, *args):
        """What non-reentrant checkpointing keeps of a region: its inputs; its own saves come back, one region
        at a time, while the backward recomputes it."""
        for a in args:
            if isinstance(a, torch.Tensor):
                keeper(kept, hold=True)(a)
        inside = {}
        with torch.autograd.graph.saved_tensors_hooks(keeper(inside, hold=True), lambda tensor: tensor):
            out = module(*args)
        regions.append(sum(n for k, n in alive(inside).items() if k not in kept))
        return out

    if checkpointing:
        unet.enable_gradient_checkpointing(checkpoint)
    fused = mock.patch.object(F, "scaled_dot_product_attention", lambda q, k, v, *a, **kw: _FusedAttention.apply(q, k, v))
    with torch.autograd.graph.saved_tensors_hooks(keeper(kept, hold=False), lambda tensor: tensor), fused, \
            _CudaAutocast(low, weight_copy) if low else contextlib.nullcontext():
        output = unet(*args, **kwargs)  # alive: its graph holds what the backward needs
        total = sum(alive(kept).values())
    del output
    return total, sum(t.untyped_storage().nbytes() for t in copies.values()), max(regions)


class _CudaAutocast(torch.overrides.TorchFunctionMode):
    """CUDA autocast's casting rules, on meta tensors (which real autocast leaves alone): matmuls, convolutions
    and attention run in half precision, normalisations and softmax in float32, everything else in what its
    inputs promote to. So the saved tensors get the dtypes, and the sizes, a GPU run gives them. Autocast
    keeps its half-precision copy of each weight until it exits, checkpointed regions or not: `keep` them."""

    HALF = {F.conv2d, F.linear, torch.matmul, torch.bmm, torch.baddbmm, torch.Tensor.matmul}
    FLOAT32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax}

    def __init__(self, dtype: torch.dtype, keep):
        super().__init__()
        self.dtype, self.keep = dtype, keep

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = self.dtype if func in self.HALF else torch.float32 if func in self.FLOAT32 else None
        if target is not None:
            def cast(a):
                if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.dtype == target:
                    return a
                return self.keep(a.to(target)) if isinstance(a, torch.nn.Parameter) else a.to(target)
            args, kwargs = [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class _FusedAttention(torch.autograd.Function):
    """Attention as the fused GPU kernels (flash, cuDNN, memory-efficient) keep it for the backward: q, k, v,
    the output and the float32 log-sum-exp of each row, not the attention matrix the plain formula makes."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the forward is only counted
        raise NotImplementedError


@dataclass
class Estimate:
    parts: dict[str, int]  # bytes
    trainable: int  # the student's parameters that train

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()) * 1.1)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {_size(v)}" for k, v in self.parts.items() if v)
        return f"~{_size(self.total)} per GPU ({parts}, +10%)"


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


@dataclass
class ModelSizes:
    """What the estimate needs to know of a run's models."""

    unet: int  # UNet parameters
    text: int  # parameters of every distinct text encoder
    teachers: int  # distinct teacher UNets on the device (a previous student counts once)
    unet_config: Path  # the UNet's config.json, for its activations
    unet_shapes: dict = field(default_factory=dict)  # weight name -> shape, for a LoRA student's adapter
    teacher_ids: list[str] = field(default_factory=list)  # per teacher: its UNet's identity (shared = one UNet)
    # text encoder identity -> parameters, and the ones the base and each teacher read: a sharded process loads
    # only its teachers' (and the student's)
    encoder_sizes: dict[str, int] = field(default_factory=dict)
    encoders_read: list[list[str]] = field(default_factory=list)  # [base, teacher 0, teacher 1, ...]

    def text_held(self, placement: str, processes: int) -> int:
        """Text-encoder parameters on the process that holds the most."""
        from .placement import teacher_ranges

        if not self.encoders_read:
            return self.text
        if placement != "shard":
            return sum(self.encoder_sizes.values())
        base, *teachers = self.encoders_read
        return max(sum(self.encoder_sizes[e] for e in set(base).union(*(teachers[i] for i in held)))
                   for held in teacher_ranges(len(teachers), processes))

    def held_teachers(self, placement: str, processes: int) -> int:
        """Distinct teacher UNets on the process that holds the most."""
        from .placement import teacher_ranges

        if placement != "shard" or not self.teacher_ids:
            return self.teachers
        return max(len({self.teacher_ids[i] for i in held}) for held in teacher_ranges(len(self.teacher_ids),
                                                                                          processes))

    def fsdp_units(self) -> tuple[int, int]:
        """(parameters outside every repeated block, parameters of the largest block)."""
        blocks: dict[str, int] = {}
        rest = 0
        for name, shape in self.unet_shapes.items():
            found = _BLOCK.match(name)
            if found:
                blocks[found.group(1)] = blocks.get(found.group(1), 0) + math.prod(shape)
            else:
                rest += math.prod(shape)
        return rest, max(blocks.values(), default=0)


def model_sizes(base: Path, teachers: list[Path | None], previous: Path | None = None) -> ModelSizes:
    """Sizes read from the weights files' headers: nothing is loaded."""
    ids = [component_sha256(f / "unet") if f is not None else "previous" for f in teachers]
    encoders, read = {}, []  # one of each distinct text encoder (SDXL has two per model)
    for folder in [base, *(t or base for t in teachers)]:  # old styles read the base's encoders
        parts = {component_sha256(folder / part): folder / part for part in ENCODER_PARTS if (folder / part).is_dir()}
        read.append(list(parts))
        for key, part in parts.items():
            encoders.setdefault(key, part)
    shapes = component_shapes(base / "unet")
    sizes = {key: parameters(folder) for key, folder in encoders.items()}
    return ModelSizes(sum(math.prod(s) for s in shapes.values()), sum(sizes.values()), len(set(ids)),
                      base / "unet" / "config.json", shapes, ids, sizes, read)


def rows_per_process(train, teachers: int, processes: int) -> int:
    """The most samples a process trains on in one micro-batch: batch_size, or with shard its teachers' share of
    the step batch (balanced over the styles, the remainder rotating)."""
    from .placement import teacher_ranges

    if train.teacher_placement != "shard" or processes == 1:
        return train.batch_size
    each = -(-train.batch_size * processes // teachers)
    return min(train.batch_size * processes, max(len(r) for r in teacher_ranges(teachers, processes)) * each)


def estimate(train, sizes: ModelSizes, side: int, processes: int = 1) -> Estimate:
    """The peak GPU memory of one process of a run with these `train` settings, on `processes` processes.

    The peak comes at the end of the student's forward, when every saved activation is alive and the
    gradients are not yet (they are set to None after each update); the backward frees activations as it
    makes gradients, and a UNet's last blocks hold the most activations and the fewest weights. So the
    gradients count only where they outgrow the activations."""
    p = sizes.unet
    b = 4 if train.precision == "no" else 2
    student, lora = train.student, None
    trained, frozen = p, 0  # a LoRA student trains its adapter; its base stays in the training dtype
    if student.type == "lora":
        lora = (student.rank, tuple(student.targets))
        trained, frozen = adapter_parameters(sizes.unet_shapes, student.rank, student.targets,
                                            student.extras), p
    teachers = len(sizes.teacher_ids) or sizes.teachers
    saved = activation_bytes(sizes.unet_config, side, train.precision, train.gradient_checkpointing, lora)
    activations = saved.at(rows_per_process(train, teachers, processes))
    split, gathered = 1, 0
    if train.student_sharding == "fsdp" and processes > 1:
        rest, block = sizes.fsdp_units()
        split, gathered = processes, b * (rest + 2 * block)
        if train.precision != "no":  # weights gathered in half precision: autocast keeps no copies of them
            activations -= saved.fixed
    gradients = 4 * trained // split
    held = sizes.held_teachers(train.teacher_placement, processes)
    parts = {"weights": 4 * trained // split + b * frozen, "gathered weights": gathered,
             "optimizer": (2 if train.optimizer == "adamw-8bit" else 8) * trained // split,
             "teachers": b * p * (1 if train.teacher_offload == "cpu" else held),
             "text encoders": b * sizes.text_held(train.teacher_placement, processes),
             "discriminator": b * p // 2 if train.adversarial_loss else 0,
             "ema": 4 * trained // split if train.ema is not None else 0,
             "activations": activations, "gradients beyond activations": max(gradients - activations, 0)}
    return Estimate(parts, trained)


_THRIFT = [{}, {"gradient_checkpointing": True}, {"gradient_checkpointing": True, "optimizer": "adamw-8bit"},
           {"gradient_checkpointing": True, "optimizer": "adamw-8bit", "teacher_offload": "cpu"}]


def _first_fit(train, sizes: ModelSizes, side: int, processes: int, ladder: list[dict],
               none_fits: str) -> dict[int, str]:
    answers = {}
    for card in CARDS_GB:
        answers[card] = none_fits
        for changes in ladder:
            trial = train.model_copy(update=changes)
            if estimate(trial, sizes, side, processes).total <= card * 1e9:
                # replicate and none are what one process does: not worth saying
                said = {k: v for k, v in changes.items() if v not in ("replicate", "none")}
                answers[card] = ", ".join(f"train.{k}={v}" for k, v in said.items()) or "as it is"
                break
    return answers


def fitting_settings(train, sizes: ModelSizes, side: int, processes: int = 1) -> dict[int, str]:
    """For each card size, the first of ever thriftier settings whose estimate fits, or a note that none does."""
    return _first_fit(train, sizes, side, processes, _THRIFT,
                      "does not fit even with gradient checkpointing, 8-bit AdamW and teacher offload")


def fitting_layouts(train, sizes: ModelSizes, side: int, processes: int) -> dict[int, str]:
    """For each card size on `processes` GPUs, the first placement and sharding (then thriftier settings) whose
    estimate fits: teachers sharded before the student, as sharding teachers costs no communication."""
    teachers = len(sizes.teacher_ids) or sizes.teachers
    layouts = [{"teacher_placement": "replicate", "student_sharding": "none"}]
    if processes > 1:
        if train.student.type == "full" and train.precision != "fp16" and train.optimizer == "adamw":
            layouts.append({"teacher_placement": "replicate", "student_sharding": "fsdp"})
        if processes <= teachers:
            layouts.insert(1, {"teacher_placement": "shard", "student_sharding": "none"})
            if len(layouts) == 3:
                layouts.append({"teacher_placement": "shard", "student_sharding": "fsdp"})
    ladder = [{**layout, **thrift} for thrift in _THRIFT for layout in layouts
              if layout["student_sharding"] == "none" or thrift.get("optimizer") != "adamw-8bit"]
    return _first_fit(train, sizes, side, processes, ladder, "does not fit with any placement or sharding, even with "
                      "gradient checkpointing, 8-bit AdamW and teacher offload")
