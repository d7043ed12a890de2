"""`dmm export` as a function: a student's styles as plain checkpoints, the released DMM layout, or any
model as one original-layout file for A1111 / ComfyUI."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import console
from ..errors import BadInput
from ..files.atomic import atomic_file, atomic_folder, check_replaceable, output_lock, remove_leftovers
from ..files.images import slug
from ..files.safetensors_io import read_component
from ..files.text import read_json
from ..models import lora, references
from ..models.folders import copy_part, derived_model_index, model_family, model_root, parts_besides_unet
from ..models.lora_student import is_lora_student
from ..models.official import OFFICIAL_PIPELINE_CLASS, OFFICIAL_UNET_CLASS, official_unet
from ..models.single_file import export_single_file
from ..models.styles import STYLES_FILE, Style, StyleTable, parse_style, style_slugs
from .bake import bake
from .lora_file import DIFFUSERS_FILE as LORA_DIFFUSERS_FILE
from .lora_file import FORMATS as LORA_FORMATS
from .lora_file import style_lora

FORMATS = ("diffusers", "dmm-official", *LORA_FORMATS)
OFFICIAL_ROWS = 8  # the style table of the released checkpoint and of the ComfyUI-DMM nodes' UNet
UNET_FILE = "diffusion_pytorch_model.safetensors"


def eval_figures(folder: Path, metrics: Path | None, index: int | None) -> dict:
    """The run's `dmm eval` figures for this style, from --metrics or RUN/eval/metrics.json, if there are any."""
    path = metrics or folder / "eval" / "metrics.json"
    if not path.is_file():
        if metrics is not None:
            raise BadInput(f"--metrics {metrics}: no such file")
        return {}
    try:
        data = read_json(path)
        entry = next(m for m in data["models"] if m["kind"] == "student")
    except (ValueError, KeyError, TypeError, StopIteration):  # ValueError: bad JSON, or not UTF-8
        raise BadInput(f"--metrics {path}: not a dmm eval metrics.json with a student in it") from None
    figures = {"metrics_file": path.name, "fid_t": entry["fid_t"], "fid_t_over_reference": entry.get(
        "fid_t_over_reference"), "style_accuracy": entry.get("style_accuracy")}
    if index is not None and index < len(entry.get("diag", [])):
        figures["fid_of_this_style"] = entry["diag"][index]
    return figures


def _card(source: str, label: str, vector: list[float], names: list[str], figures: dict) -> str:
    mix = ", ".join(f"{n} {w:g}" for n, w in zip(names, vector) if w)
    numbers = "\n".join(f"- {k}: {v}" for k, v in figures.items()) or "No `dmm eval` figures were found for this run."
    return f"""---
library_name: diffusers
tags: [stable-diffusion, dmm, model-merging]
---

# {label}: one style of a DMM student, baked into a plain checkpoint

Exported by `dmm export` from `{source}`. The student's style vector ({mix}) is folded into the UNet's
timestep-embedding bias, so this is a plain Stable Diffusion model: no style input, and the same
pictures as `dmm generate --style` on the student for the same seed and sampler.

## Evaluation of the run

{numbers}
"""


def export(ref: str, *, style: str | None = None, output: Path | None = None, single_file: bool = False,
           fmt: str = "diffusers", dtype: torch.dtype | None = None, metrics: Path | None = None,
           overwrite: bool = False) -> list[Path]:
    """Write the requested exports and return their paths."""
    if fmt not in FORMATS:
        raise BadInput(f"--format: unknown format {fmt!r} (use {', '.join(FORMATS)})")
    if fmt == "dmm-official" and style is not None:
        raise BadInput("--format dmm-official writes the whole student, every style: leave out --style")
    if fmt in LORA_FORMATS and (style is None or single_file):
        raise BadInput(f"--format {fmt} writes one LoRA file per style: give --style (a name, an index, a mix "
                       "a:0.5,b:0.5, or all), without --single-file")
    if fmt == "diffusers" and style is None and not single_file:
        raise BadInput("nothing to export: give --style (bake a style), --single-file, or --format dmm-official")
    folder = lora.resolve(ref)  # MODEL+LORA: its fused folder
    if fmt == "dmm-official" and model_family(folder) == "SDXL":
        raise BadInput(f"{ref}: --format dmm-official is the released SD1.x layout, whose style embedding takes the "
                       "slot of SDXL's text-time embedding; export an SDXL student as a folder or a single file")
    table = StyleTable.read(folder)
    if table is not None:
        table = _shared(table)
    source = lora.shareable(ref)  # how shared files name the model: never a path of this machine
    if (style is not None or fmt == "dmm-official") and table is None:
        raise BadInput(f"{ref}: not a DMM student (no {STYLES_FILE}), so it has no styles to export")
    if fmt == "diffusers" and single_file and style is None and table is not None and model_family(folder) == "SDXL":
        raise BadInput(f"{ref}: an SDXL student goes into one file a style at a time (export --style with a style's "
                       "name or index, a mix a:0.5,b:0.5, or all): the file's label_emb is SDXL's text-time embedding, "
                       "with no room for a style embedding")
    if fmt == "diffusers" and single_file and style is None and table is not None:
        raise BadInput(f"{ref}: a DMM student has no single-file form that A1111, ComfyUI or Forge load; give --style "
                       "with a style's name or index, a mix (a:0.5,b:0.5) or all, to bake styles into plain files, "
                       "or --format dmm-official --single-file for the ComfyUI-DMM nodes")
    if fmt == "dmm-official" and single_file and len(table.names) > OFFICIAL_ROWS:
        raise BadInput(f"{ref}: has {len(table.names)} styles, and the ComfyUI-DMM nodes' file holds {OFFICIAL_ROWS}; "
                       "export it as a --format dmm-official folder, or bake styles with --style")
    if fmt in LORA_FORMATS and not is_lora_student(folder):
        raise BadInput(f"{ref}: --format {fmt} exports a LoRA student's adapter (train.student.type lora), and "
                       f"{'this is a full student' if table else 'this is not a dmm student'}; bake a full "
                       "student's style with --style instead")
    stem = slug(ref if lora.split_ref(ref)[1] else folder.name)  # a fused folder's name is a digest
    suffix = ".safetensors" if single_file or fmt == "lora" else ""
    if fmt == "dmm-official":
        targets = [(Path(output or f"{stem}-dmm-official{suffix}"), None, None)]
    elif style is None:
        targets = [(Path(output or f"{stem}{suffix or '.safetensors'}"), None, None)]
    else:
        styles = parse_style(style, table.names)
        if style.strip() == "all":
            base = Path(output or f"{stem}-{'loras' if fmt in LORA_FORMATS else 'styles'}")
            if base.suffix == ".safetensors":
                raise BadInput(f"--output {base}: --style all writes one file per style, into a folder; give a "
                               "folder name")
            names = style_slugs([label for label, _ in styles], table.names)
            targets = [(base / f"{name}{suffix}", label, vector) for name, (label, vector) in zip(names, styles)]
        else:
            (label, vector), = styles
            name = style_slugs([label], table.names)[0]
            targets = [(Path(output or f"{stem}-{name}{'-lora' * (fmt in LORA_FORMATS)}{suffix}"), label, vector)]
    if (single_file or fmt == "lora") and any(path.suffix != ".safetensors" for path, _, _ in targets):
        raise BadInput(f"--output {targets[0][0]}: a single file{' (--format lora)' * (fmt == 'lora')} must end in "
                       ".safetensors")
    for path, _, _ in targets:
        check_replaceable(path, overwrite, "export", "dmm.source")
    unet_config = read_json(folder / "unet" / "config.json")
    weights = read_component(folder / "unet") if fmt not in LORA_FORMATS else {}
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    written = []
    for path, label, vector in targets:
        with output_lock(path):
            remove_leftovers(path)
            check_replaceable(path, overwrite, "export", "dmm.source")
            if fmt == "dmm-official" and single_file:
                _write_official_file(folder, path, official_unet(weights, unet_config), table, dtype, source)
            elif fmt == "dmm-official":
                _write_folder(folder, path, *official_unet(weights, unet_config), metadata={"dmm.source": source},
                              table=table)
            elif fmt in LORA_FORMATS:
                _write_lora(path, fmt, style_lora(folder, vector, fmt, dtype), {
                    "dmm.source": source, "dmm.style": label, "dmm.base": table.lineage[0].get("base", ""),
                    "dmm.style_vector": json.dumps(dict(zip(table.names, vector.tolist())))})
            elif vector is None:
                export_single_file(folder, path, dtype, metadata={"dmm.source": source})
            else:
                index = int(vector.argmax()) if vector.max() == 1 else None
                figures = eval_figures(folder, metrics, index)
                baked = bake(weights, unet_config, vector)
                meta = {"dmm.source": source, "dmm.style": label, "dmm.style_vector": json.dumps(
                    dict(zip(table.names, vector.tolist()))), "dmm.eval": json.dumps(figures)}
                card = _card(source, label, vector.tolist(), table.names, figures)
                if single_file:
                    export_single_file(folder, path, dtype, unet=baked, metadata=meta)
                else:
                    _write_folder(folder, path, *baked, metadata=meta, card=card)
        console.say(f"export: wrote {path}")
        written.append(path)
    return written


def _write_lora(target: Path, fmt: str, tensors: dict, metadata: dict) -> None:
    """One style's LoRA: a kohya file, or a folder holding diffusers' pytorch_lora_weights.safetensors."""
    if fmt == "lora":
        with atomic_file(target) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        return
    with atomic_folder(target) as tmp:
        save_file(tensors, tmp / LORA_DIFFUSERS_FILE, metadata=metadata)


def _write_official_file(source: Path, target: Path, unet: tuple[dict, dict], table: StyleTable,
                         dtype: torch.dtype | None, name: str) -> None:
    """The released DMM checkpoint as one original-layout file, as the ComfyUI-DMM nodes load it: the UNet,
    VAE and text encoder under their usual names, and the style table `model_embedding` (8 rows, zero past the
    student's styles) with its MLP `add_embedding` in the UNet."""
    weights, config = unet
    table_rows = weights["model_embedding.weight"]
    if len(table_rows) < OFFICIAL_ROWS:
        padding = table_rows.new_zeros(OFFICIAL_ROWS - len(table_rows), table_rows.shape[1])
        weights = {**weights, "model_embedding.weight": torch.cat([table_rows, padding])}
        console.say(f"export: rows {len(table_rows)}-{OFFICIAL_ROWS - 1} of the style table are zero padding (the "
                    f"ComfyUI-DMM nodes take {OFFICIAL_ROWS}); its styles are indices 0-{len(table_rows) - 1}")
    export_single_file(source, target, dtype, unet=(weights, config),
                       metadata={"dmm.source": name, "dmm.format": "dmm-official", "dmm.styles": table.to_json()})


def _shared(table: StyleTable) -> StyleTable:
    """A student's style table as shared files carry it: teachers and lineage by reference, not by local path
    (students distilled before dmm wrote them so kept their paths)."""
    styles = [Style(s.name, lora.shareable(s.teacher), s.sha256, s.extra) for s in table.styles]
    lineage = [{k: references.shareable(v) if k in ("base", "init_from", "source") and isinstance(v, str) else v
                for k, v in entry.items()} for entry in table.lineage]
    return StyleTable(styles, lineage)


def _write_folder(source: Path, target: Path, weights: dict, config: dict, *, metadata: dict | None = None,
                  card: str | None = None, table: StyleTable | None = None) -> None:
    """A pipeline folder: `source`'s parts with this UNet; with a style `table`, the released layout's class
    names and the table beside it."""
    with atomic_folder(target) as tmp:
        for part in parts_besides_unet(source):
            copy_part(source / part, tmp / part, model_root(source))
        (tmp / "unet").mkdir()
        (tmp / "unet" / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "unet" / UNET_FILE,
                  metadata={"dmm.source": source.name, **(metadata or {})})
        if table is not None:
            (tmp / "model_index.json").write_text(derived_model_index(
                source, _class_name=OFFICIAL_PIPELINE_CLASS, unet=["dmm_unet", OFFICIAL_UNET_CLASS]), encoding="utf-8")
            (tmp / STYLES_FILE).write_text(table.to_json(), encoding="utf-8")  # names, for dmm's own import
        else:
            (tmp / "model_index.json").write_text(derived_model_index(source), encoding="utf-8")
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
