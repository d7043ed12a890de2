"""Weight-space merges, the baselines DMM must beat: one small registered function per method.

Every method sees one tensor at a time, in fp32: the base's (or None) and each teacher's, plus the
teacher weights. The driver streams tensors from the inputs' safetensors files to the output file,
so memory stays at a few tensors × N whatever the model size.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import console, hub
from .checkpoint import (TORCH_DTYPES, StreamingWriter, TensorReader, atomic_folder, component_sha256_many,
                         weight_files)
from .errors import BadInput, ModelError
from .folders import derived_model_index


@dataclasses.dataclass(frozen=True)
class MergeParams:
    weights: tuple[float, ...]
    density: float = 0.2
    lam: float = 1.0
    seed: int = 0
    dare_sign: bool = False


@dataclasses.dataclass(frozen=True)
class Method:
    fn: Callable
    needs_base: bool
    min_teachers: int
    help: str


METHODS: dict[str, Method] = {}


def register(name: str, *, needs_base: bool, min_teachers: int, help: str):
    def wrap(fn):
        METHODS[name] = Method(fn, needs_base, min_teachers, help)
        return fn
    return wrap


def disjoint_mean(delta, n: int, weights) -> torch.Tensor:
    """TIES' sign election and disjoint mean over task vectors `delta(i)`, i < n, in two passes.

    Each pass asks for one task vector at a time, so memory holds a few tensors whatever n is."""
    total = None
    for i in range(n):
        d = delta(i)
        total = d * weights[i] if total is None else total.add_(d, alpha=weights[i])
    elected = total.sign_()
    num = torch.zeros_like(elected)
    den = torch.zeros_like(elected)
    for i in range(n):
        d = delta(i).mul_(elected)  # in place, no temporary: |δᵢ| where δᵢ agrees with the elected sign, else ≤ 0
        den.add_(d > 0, alpha=weights[i])
        num.addcmul_(d.clamp_(min=0), elected, value=weights[i])
    return num.div_(den.masked_fill_(den == 0, 1.0))


# `models[i]` is teacher i's tensor in its stored dtype (fp16, say); sums are kept in fp32.


@register("average", needs_base=False, min_teachers=2,
          help="Σ wᵢθᵢ / Σ wᵢ: the paper's weighted merging (equal weights by default).")
def average(base, models, params, key):
    total = None
    for i in range(len(models)):
        m = models[i]
        total = torch.zeros(m.shape, dtype=torch.float32, device=m.device) if total is None else total
        total.add_(m, alpha=params.weights[i])
    return total.div_(sum(params.weights))


@register("task-arithmetic", needs_base=True, min_teachers=1,
          help="base + λ·Σ wᵢ(θᵢ − base).")
def task_arithmetic(base, models, params, key):
    total = torch.zeros_like(base)
    for i in range(len(models)):
        total.add_(models[i] - base, alpha=params.weights[i])
    return total.mul_(params.lam).add_(base)


def trim_threshold(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """The magnitude of the k-th largest entry, k = ⌈density·numel⌉ (at least one); None keeps everything."""
    k = max(1, math.ceil(density * delta.numel()))
    if k >= delta.numel():
        return None
    magnitude = delta.abs().view(-1)
    index = magnitude.numel() - k
    if magnitude.device.type == "cpu":
        # numpy selects in place; kthvalue would also hold an int64 index per entry (2× an fp32 tensor)
        magnitude.numpy().partition(index)
        return magnitude[index].clone()
    return magnitude.kthvalue(index + 1).values


TIES_KEEP_BYTES = 256 << 20  # trimmed task vectors up to this size stay in memory between passes


@register("ties", needs_base=True, min_teachers=2,
          help="Trim task vectors to the top `density` by magnitude, elect signs by Σ wᵢδᵢ, disjoint mean; "
               "base + λ·mean.")
def ties(base, models, params, key):
    n = len(models)
    keep = base.numel() * base.element_size() * n <= TIES_KEEP_BYTES

    def prepare(i):
        d = models[i] - base
        threshold = trim_threshold(d, params.density)
        if threshold is not None:
            d.mul_(d.abs() >= threshold)
        return threshold, d if keep else None

    # kthvalue runs on one core: trim teachers side by side, unless their tensors are large
    workers = min(n, os.cpu_count() or 1) if keep else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        prepared = list(pool.map(prepare, range(n)))

    def trimmed(i):
        threshold, d = prepared[i]
        if d is not None:
            return d
        d = models[i] - base
        return d if threshold is None else d.mul_(d.abs() >= threshold)

    return disjoint_mean(trimmed, n, params.weights).mul_(params.lam).add_(base)


def dare_mask(shape, density: float, seed: int, key: str, index: int, device) -> torch.Tensor:
    """A Bernoulli(density) keep-mask that depends only on (seed, tensor name, teacher index)."""
    digest = hashlib.sha256(f"{seed}:{key}:{index}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return (torch.rand(shape, generator=g) < density).to(device)


@register("dare", needs_base=True, min_teachers=2,
          help="Drop task-vector entries with a seeded Bernoulli keep-mask (p = density), rescale by 1/density, "
               "then base + λ·Σ wᵢδᵢ (or TIES' sign election with --dare-sign).")
def dare(base, models, params, key):
    def dropped(i):
        d = models[i] - base
        return d.mul_(dare_mask(d.shape, params.density, params.seed, key, i, d.device)).div_(params.density)

    if params.dare_sign:
        return disjoint_mean(dropped, len(models), params.weights).mul_(params.lam).add_(base)
    total = torch.zeros_like(base)
    for i in range(len(models)):
        total.add_(dropped(i), alpha=params.weights[i])
    return total.mul_(params.lam).add_(base)


def default_lambda(method: str, n: int, dare_sign: bool = False) -> float:
    """1/N where the method sums task vectors (so equal weights give their mean), else 1."""
    return 1.0 / n if method == "task-arithmetic" or method == "dare" and not dare_sign else 1.0


MERGED_PARTS = ("unet", "text_encoder", "text_encoder_2")


class _Inputs:
    """One component's tensors (across its shard files), read one at a time by name."""

    def __init__(self, component: Path):
        self.readers = [TensorReader(f) for f in weight_files(component)]
        self.where = {name: r for r in self.readers for name in r.header}
        self.header = {name: entry for r in self.readers for name, entry in r.header.items()}

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get(name)

    def shapes(self) -> dict[str, list[int]]:
        return {k: v["shape"] for k, v in self.header.items()}


def _first_mismatch(reference: dict, other: dict) -> str | None:
    for key in sorted(set(reference) | set(other)):
        if reference.get(key) != other.get(key):
            return key
    return None


def _output_name(component: Path) -> str:
    first = weight_files(component)[0].name
    return "diffusion_pytorch_model.safetensors" if first.startswith("diffusion_pytorch_model") else "model.safetensors"


def merge_component(method: str, base: Path | None, teachers: list[Path], out_dir: Path, params: MergeParams,
                    metadata: dict[str, str], *, dtype: torch.dtype | None = None, device: str = "cpu",
                    labels: list[str] | None = None) -> Path:
    """Merge one component (e.g. unet/) tensor by tensor into `out_dir`, which gets the config and weights."""
    fn = METHODS[method].fn
    base_in = _Inputs(base) if base is not None else None
    teacher_in = [_Inputs(t) for t in teachers]
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
    specs = {}
    for name in sorted(reference):
        stored = TORCH_DTYPES[source.header[name]["dtype"]]
        out = dtype if dtype is not None and stored.is_floating_point else stored
        specs[name] = (out, reference[name])
    out_dir.mkdir(parents=True, exist_ok=True)
    config = (base or teachers[0]) / "config.json"
    if config.is_file():
        shutil.copyfile(config, out_dir / "config.json")
    target = out_dir / _output_name(base or teachers[0])
    use_base = base_in is not None and METHODS[method].needs_base

    def read(name):
        return source.get(name), base_in.get(name) if use_base else None, [inp.get(name) for inp in teacher_in]

    names = list(specs)
    # The next tensor is read while this one is merged: file reads and torch both release the GIL.
    with open(target, "wb") as f, ThreadPoolExecutor(max_workers=1) as reader:
        writer = StreamingWriter(f, specs, metadata)
        upcoming = reader.submit(read, names[0])
        for k, name in enumerate(tqdm(names, desc=f"{method} {out_dir.name}", unit="tensor",
                                      disable=console.progress_disabled(), leave=False)):
            first, b, models = upcoming.result()
            if k + 1 < len(names):
                upcoming = reader.submit(read, names[k + 1])
            if not first.is_floating_point():
                writer.write(name, first)
                continue
            b = b.to(device, torch.float32) if b is not None else None
            merged = fn(b, [m.to(device) for m in models], params, name)
            writer.write(name, merged.to(specs[name][0]))
    return target


def check_request(method: str, teachers: list[str], base: str | None, weights: list[float] | None,
                  density: float) -> None:
    if method not in METHODS:
        raise BadInput(f"--method: unknown method {method!r} (use {', '.join(METHODS)})")
    spec = METHODS[method]
    if len(teachers) < spec.min_teachers:
        raise BadInput(f"--method {method} needs at least {spec.min_teachers} teachers (got {len(teachers)})")
    if spec.needs_base and base is None:
        raise BadInput(f"--method {method} needs --base (the model the teachers were fine-tuned from)")
    if not 0 < density <= 1:
        raise BadInput(f"--density must be in (0, 1] (got {density})")
    if weights is not None and len(weights) != len(teachers):
        raise BadInput(f"--weights: {len(weights)} weights for {len(teachers)} teachers")
    if weights is not None and sum(weights) == 0 and method == "average":
        raise BadInput("--weights must not add up to 0 for average")


def _differs(folders: list[Path], part: str) -> bool:
    return len(set(component_sha256_many([f / part for f in folders if (f / part).is_dir()]))) > 1


def baseline_merge(method: str, teachers: list[str], *, base: str | None = None, weights: list[float] | None = None,
                   density: float = 0.2, lam: float | None = None, seed: int = 0, dare_sign: bool = False,
                   output: Path, vae: str | None = None, dtype: torch.dtype | None = None, device: str = "cpu",
                   overwrite: bool = False) -> Path:
    """Merge the teachers' weights with `method` into a diffusers pipeline folder at `output`."""
    check_request(method, teachers, base, weights, density)
    output = Path(output)
    if output.exists() and not overwrite:
        raise BadInput(f"--output {output}: already exists; pass --overwrite to replace it")
    base_dir = hub.resolve(base) if base else None
    teacher_dirs = [hub.resolve(t) for t in teachers]
    vae_dir = hub.resolve(vae) if vae else None
    classes = {json.loads((f / "model_index.json").read_text())["_class_name"]
               for f in teacher_dirs + ([base_dir] if base_dir else [])}
    if len(classes) > 1:
        raise BadInput(f"teachers of different architectures ({', '.join(sorted(classes))}) cannot be merged")
    weights = list(weights) if weights is not None else [1.0] * len(teachers)
    lam = default_lambda(method, len(teachers), dare_sign) if lam is None else lam
    params = MergeParams(tuple(weights), density, lam, seed, dare_sign)
    template = base_dir or teacher_dirs[0]
    everyone = teacher_dirs + ([base_dir] if base_dir else [])
    parts = [p for p in MERGED_PARTS if (template / p).is_dir() and (p == "unet" or _differs(everyone, p))]
    unet_sha = component_sha256_many([f / "unet" for f in everyone])
    inputs = {"base": {"ref": base, "sha256": unet_sha[-1]} if base_dir else None,
              "teachers": [{"ref": r, "sha256": h} for r, h in zip(teachers, unet_sha)]}
    metadata = {"dmm.method": method, "dmm.params": json.dumps({"weights": weights, "density": density, "lambda": lam,
                                                               "dare_sign": dare_sign}),
                "dmm.seed": str(seed), "dmm.inputs": json.dumps(inputs)}
    console.say(f"merge: {method} of {len(teachers)} teachers; merging {', '.join(parts)}")
    with atomic_folder(output) as tmp:
        for part in parts:
            merge_component(method, base_dir / part if base_dir else None, [f / part for f in teacher_dirs],
                            tmp / part, params, metadata, dtype=dtype, device=device, labels=teachers)
        for part in sorted(p.name for p in template.iterdir() if p.is_dir() and p.name not in parts):
            source = vae_dir / "vae" if part == "vae" and vae_dir else template / part
            shutil.copytree(source, tmp / part, symlinks=False)
        (tmp / "model_index.json").write_text(derived_model_index(template))
        (tmp / "README.md").write_text(_card(method, params, base, teachers, parts, vae))
    return output


def _card(method, params: MergeParams, base, teachers, parts, vae) -> str:
    rows = "\n".join(f"| `{t}` | {w:g} |" for t, w in zip(teachers, params.weights))
    return f"""---
library_name: diffusers
tags: [stable-diffusion, model-merging, {method}]
---

# Weight-space merge: {method}

A `dmm baseline-merge` of {len(teachers)} teachers{f" over the base `{base}`" if base else ""}.
{METHODS[method].help}

| teacher | weight |
|---|---|
{rows}

density {params.density:g}, λ {params.lam:g}, seed {params.seed}{", TIES sign election" if params.dare_sign else ""}.
Merged components: {", ".join(parts)}; the rest{f" (VAE from `{vae}`)" if vae else ""} is copied from
{"the base" if base else "the first teacher"}. The safetensors `__metadata__` records the method, its
parameters and every input's sha256.
"""
