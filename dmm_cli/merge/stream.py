"""The streaming driver: one component merged tensor by tensor, from the inputs' safetensors files
straight into the output file, so memory stays at a few tensors x N whatever the model size."""
from __future__ import annotations

import ctypes
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import console
from ..errors import ModelError
from ..files.safetensors_header import weight_files
from ..files.safetensors_io import TORCH_DTYPES, StreamingWriter, TensorReader, check_finite
from ..models.lora import delta
from .registry import METHODS, MergeParams


class _Inputs:
    """One component's tensors (across its shard files), read one at a time by name."""

    def __init__(self, component: Path):
        self.readers = [TensorReader(f) for f in weight_files(component)]
        self.where = {name: r for r in self.readers for name in r.header}
        self.header = {name: entry for r in self.readers for name, entry in r.header.items()}

    def get(self, name: str) -> torch.Tensor:
        reader = self.where[name]
        tensor = reader.get(name)
        check_finite(tensor, reader.path, name)
        return tensor

    def dtype(self, name: str) -> torch.dtype:
        stored = self.header[name]["dtype"]
        if stored not in TORCH_DTYPES:
            raise ModelError(f"{self.where[name].path}: tensor {name} has dtype {stored}, which dmm does not merge")
        return TORCH_DTYPES[stored]

    def shapes(self) -> dict[str, list[int]]:
        return {k: v["shape"] for k, v in self.header.items()}


class _LoraTeacher:
    """A LoRA teacher's tensors: its model's, plus scale·up·down where its LoRAs touch them, one tensor at a time, so
    no LoRA teacher is ever materialised."""

    def __init__(self, inputs: _Inputs, part: str, loras: list):
        self.inputs, self.part, self.loras = inputs, part, loras
        self.dtype, self.shapes = inputs.dtype, inputs.shapes

    def get(self, name: str) -> torch.Tensor:
        tensor = self.inputs.get(name)
        update = delta(self.loras, self.part, name, tensor.shape) if tensor.is_floating_point() else None
        return tensor if update is None else tensor.float() + update


def _first_mismatch(reference: dict, other: dict) -> str | None:
    for key in sorted(set(reference) | set(other)):
        if reference.get(key) != other.get(key):
            return key
    return None


def widest(dtypes: list[torch.dtype]) -> torch.dtype:
    """The dtype that holds every input's values: the largest, and fp32 when fp16 meets bf16."""
    size = max(d.itemsize for d in dtypes)
    largest = {d for d in dtypes if d.itemsize == size}
    return largest.pop() if len(largest) == 1 else torch.float32


def _output_name(component: Path) -> str:
    first = weight_files(component)[0].name
    return "diffusion_pytorch_model.safetensors" if first.startswith("diffusion_pytorch_model") else "model.safetensors"


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    Merging allocates tensors of tens of MB, hundreds of times. By default glibc serves each from fresh pages
    (mmap, or another thread's arena) and hands them back when freed, so every new tensor pays for page faults
    on first touch: several GB of them per merge, often more time than the arithmetic. One arena, no mmap and
    no trimming keep the heap at the merge's peak, and every block is reused. Elsewhere than glibc this does
    nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 1)  # M_ARENA_MAX: the reader and writer threads share the main thread's heap
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap, too
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD (a C int): never give the heap's top back
    except (OSError, AttributeError):
        pass


def merge_component(method: str, base: Path | None, teachers: list[Path], out_dir: Path, params: MergeParams,
                    metadata: dict[str, str], *, dtype: torch.dtype | None = None, device: str = "cpu",
                    labels: list[str] | None = None, loras: list[list] | None = None) -> Path:
    """Merge one component (e.g. unet/) tensor by tensor into `out_dir`, which gets the config and weights.
    `loras`: each teacher's LoRAs (models.lora), added to its tensors as they are read."""
    fn = METHODS[method].fn
    base_in = _Inputs(base) if base is not None else None
    teacher_in = [_Inputs(t) for t in teachers]
    if loras is not None:
        teacher_in = [_LoraTeacher(t, out_dir.name, own) if own else t for t, own in zip(teacher_in, loras)]
    labels = labels or [str(t) for t in teachers]
    reference = (base_in or teacher_in[0]).shapes()
    against = "the base's" if base_in else "the first teacher's"
    for label, inputs in zip(labels, teacher_in):
        shapes = inputs.shapes()
        bad = _first_mismatch(reference, shapes)
        if bad is not None:
            raise ModelError(f"teacher {label}: its {out_dir.name}/ differs from {against} at key {bad} "
                             f"({shapes.get(bad, 'missing')} vs {reference.get(bad, 'missing')})")
    source = base_in or teacher_in[0]
    everyone = ([base_in] if base_in else []) + teacher_in
    specs = {}
    for name in sorted(reference):
        stored = source.dtype(name)
        if stored.is_floating_point:  # never narrower than the widest input, unless asked
            stored = dtype or widest([inputs.dtype(name) for inputs in everyone])
        specs[name] = (stored, reference[name])
    out_dir.mkdir(parents=True, exist_ok=True)
    config = (base or teachers[0]) / "config.json"
    if config.is_file():
        shutil.copyfile(config, out_dir / "config.json")
    target = out_dir / _output_name(base or teachers[0])
    use_base = base_in is not None and METHODS[method].needs_base

    def read(name):  # each input once; the base only where it is used: by the method, or as a copied non-float
        needs_base = base_in is not None and (use_base or not specs[name][0].is_floating_point)
        return base_in.get(name) if needs_base else None, [inp.get(name) for inp in teacher_in]

    names = list(specs)
    # The next tensor is read, and the last one written, while this one is merged: file reads and writes and
    # torch all release the GIL. One write at a time is in flight, so memory holds at most one extra tensor.
    with open(target, "wb") as f, ThreadPoolExecutor(max_workers=1) as reader, \
            ThreadPoolExecutor(max_workers=1) as writes:
        writer = StreamingWriter(f, specs, metadata)
        upcoming, written = reader.submit(read, names[0]), None
        for k, name in enumerate(tqdm(names, desc=f"{method} {out_dir.name}", unit="tensor",
                                      disable=console.progress_disabled(), leave=False)):
            b, models = upcoming.result()
            if k + 1 < len(names):
                upcoming = reader.submit(read, names[k + 1])
            if specs[name][0].is_floating_point:
                b = b.to(device, torch.float32) if b is not None else None
                out = fn(b, [m.to(device) for m in models], params, name).to(specs[name][0])
            else:  # copied, from the base if there is one
                out = models[0] if b is None else b
            if written is not None:
                written.result()  # a failed write stops the merge here
            written = writes.submit(writer.write, name, out)
        written.result()
    return target
