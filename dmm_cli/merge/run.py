"""`dmm baseline-merge` as a function: check the request, then merge a whole pipeline folder atomically."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .. import console
from ..errors import BadInput
from ..files.atomic import atomic_folder, check_replaceable, output_lock, remove_leftovers
from ..files.hashing import component_sha256_many
from ..files.text import read_json
from ..models import lora, references
from ..models.devices import pick_device
from ..models.folders import check_links, copy_part, derived_model_index, model_family, model_root
from .registry import METHODS, OPTIONS, MergeParams
from .stream import keep_freed_memory, merge_component

MERGED_PARTS = ("unet", "text_encoder", "text_encoder_2")


def default_lambda(method: str, n: int, dare_sign: bool = False) -> float:
    """1/N where the method sums task vectors (so equal weights give their mean), else 1."""
    return 1.0 / n if method == "task-arithmetic" or method == "dare" and not dare_sign else 1.0


SEED_LIMIT = 2**63


def check_request(method: str, teachers: list[str], base: str | None, weights: list[float] | None,
                  density: float | None = None, lam: float | None = None, seed: int | None = None,
                  dare_sign: bool = False) -> None:
    if method not in METHODS:
        raise BadInput(f"--method: unknown method {method!r} (use {', '.join(METHODS)})")
    spec = METHODS[method]
    given = {"density": density is not None, "lambda": lam is not None, "seed": seed is not None,
             "dare_sign": dare_sign}
    for option in OPTIONS:
        if given[option] and option not in spec.uses:
            raise BadInput(f"{OPTIONS[option]} has no effect on --method {method}; leave it out")
    if len(teachers) < spec.min_teachers:
        raise BadInput(f"--method {method} needs at least {spec.min_teachers} teachers (got {len(teachers)})")
    if spec.needs_base and base is None:
        raise BadInput(f"--method {method} needs --base (the model the teachers were fine-tuned from)")
    if density is not None and not 0 < density <= 1:
        raise BadInput(f"--density must be in (0, 1] (got {density})")
    if lam is not None and not math.isfinite(lam):
        raise BadInput(f"--lambda must be a finite number (got {lam})")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise BadInput(f"--seed must be between 0 and 2**63 - 1 (got {seed})")
    if weights is not None and len(weights) != len(teachers):
        raise BadInput(f"--weights: {len(weights)} weights for {len(teachers)} teachers")
    if weights is not None and not all(math.isfinite(w) for w in weights):
        raise BadInput(f"--weights must be finite numbers (got {', '.join(f'{w:g}' for w in weights)})")
    if weights is not None and sum(weights) == 0 and method == "average":
        raise BadInput("--weights must not add up to 0 for average")


def _differs(folders: list[Path], part: str) -> bool:
    return len(set(component_sha256_many([f / part for f in folders if (f / part).is_dir()]))) > 1


def baseline_merge(method: str, teachers: list[str], *, base: str | None = None, weights: list[float] | None = None,
                   density: float | None = None, lam: float | None = None, seed: int | None = None,
                   dare_sign: bool = False, output: Path, vae: str | None = None, dtype: torch.dtype | None = None,
                   device: str = "cpu", overwrite: bool = False) -> Path:
    """Merge the teachers' weights with `method` into a diffusers pipeline folder at `output`.

    `density`, `lam`, `seed` and `dare_sign` may be given only to the methods that use them (None: default)."""
    check_request(method, teachers, base, weights, density, lam, seed, dare_sign)
    device = str(pick_device(device))
    output = Path(output)
    check_replaceable(output, overwrite, "baseline-merge", "dmm.method")
    with output_lock(output):
        remove_leftovers(output)
        check_replaceable(output, overwrite, "baseline-merge", "dmm.method")
        return _merge(method, teachers, base, weights, 0.2 if density is None else density, lam,
                      0 if seed is None else seed, dare_sign, output, vae, dtype, device)


def _merge(method, teachers, base, weights, density, lam, seed, dare_sign, output, vae, dtype, device) -> Path:
    base_dir = lora.resolve(base) if base else None
    split = [lora.split_ref(t) for t in teachers]
    teacher_dirs = [references.resolve(model) for model, _ in split]
    teacher_loras = [lora.load_loras(specs, folder, model) for (model, specs), folder in zip(split, teacher_dirs)]
    changed = set().union(*map(lora.parts_changed, teacher_loras))
    vae_dir = references.resolve(vae) if vae else None
    classes = {read_json(f / "model_index.json")["_class_name"]
               for f in teacher_dirs + ([base_dir] if base_dir else [])}
    if len(classes) > 1:
        raise BadInput(f"teachers of different architectures ({', '.join(sorted(classes))}) cannot be merged")
    if vae_dir is not None and (model_family(vae_dir) == "SDXL") != ("StableDiffusionXLPipeline" in classes):
        raise BadInput(f"--vae {vae}: an {model_family(vae_dir)} model's VAE, whose latents the teachers' UNets were "
                       "not trained on; take it from a model of their family")
    weights = list(weights) if weights is not None else [1.0] * len(teachers)
    lam = default_lambda(method, len(teachers), dare_sign) if lam is None else lam
    params = MergeParams(tuple(weights), density, lam, seed, dare_sign)
    template = base_dir or teacher_dirs[0]
    everyone = teacher_dirs + ([base_dir] if base_dir else [])
    parts = [p for p in MERGED_PARTS
             if (template / p).is_dir() and (p == "unet" or p in changed or _differs(everyone, p))]
    copied = {p.name: (vae_dir if p.name == "vae" and vae_dir else template)
              for p in sorted(template.iterdir()) if p.is_dir() and p.name not in parts}
    for part, owner in copied.items():  # no link may lead out of a model into the output
        check_links(owner / part, model_root(owner))
    unet_sha = component_sha256_many([f / "unet" for f in everyone])
    shared = references.shareable  # inputs by reference or name, never by a path of this machine
    inputs = {"base": {"ref": lora.shareable(base), "sha256": unet_sha[-1]} if base_dir else None,
              "teachers": [{"ref": lora.shareable(r), "sha256": h,
                            **({"loras": [{"ref": shared(x.spec.ref), "scale": x.spec.scale, "sha256": x.sha256}
                                          for x in own]} if own else {})}
                           for r, h, own in zip(teachers, unet_sha, teacher_loras)]}
    used = METHODS[method].uses
    recorded = {"weights": weights, **{k: v for k, v in (("density", density), ("lambda", lam),
                                                          ("dare_sign", dare_sign)) if k in used}}
    metadata = {"dmm.method": method, "dmm.params": json.dumps(recorded), "dmm.inputs": json.dumps(inputs),
                **({"dmm.seed": str(seed)} if "seed" in used else {})}
    console.say(f"merge: {method} of {len(teachers)} teachers; merging {', '.join(parts)}")
    keep_freed_memory()
    with atomic_folder(output) as tmp:
        for part in parts:
            merge_component(method, base_dir / part if base_dir else None, [f / part for f in teacher_dirs],
                            tmp / part, params, metadata, dtype=dtype, device=device, labels=teachers,
                            loras=teacher_loras)
        for part, owner in copied.items():
            copy_part(owner / part, tmp / part, model_root(owner))
        (tmp / "model_index.json").write_text(derived_model_index(template), encoding="utf-8")
        card = _card(method, params, base and lora.shareable(base), [lora.shareable(t) for t in teachers], parts,
                     vae and shared(vae))
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return output


def _settings(method: str, params: MergeParams) -> str:
    used = METHODS[method].uses
    words = [f"density {params.density:g}" if "density" in used else "", f"λ {params.lam:g}" if "lambda" in used else "",
             f"seed {params.seed}" if "seed" in used else "", "TIES sign election" if params.dare_sign else ""]
    return (", ".join(w for w in words if w) or "No parameters beyond the weights") + "."


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

{_settings(method, params)}
Merged components: {", ".join(parts)}; the rest{f" (VAE from `{vae}`)" if vae else ""} is copied from
{"the base" if base else "the first teacher"}. The safetensors `__metadata__` records the method, its
parameters and every input's sha256.
"""
