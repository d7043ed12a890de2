"""`dmm generate` as a function: pick the model, check the arguments, make the pictures, write each at once.

File names carry the prompt, a digest of the whole request (model, prompt, negative prompt, sampler,
size) and the seed, so different requests never collide; an existing file is replaced only with
`overwrite`. Pictures are written as their batch finishes, so a long run keeps what it made and holds
one batch in memory.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Callable

from .. import console
from ..errors import BadInput
from ..files import state
from ..files.atomic import writable_folder
from ..files.images import grid, save_png, slug
from ..interrupts import deferred
from ..models import lora, references
from ..models.devices import pick_device, pick_dtype
from ..models.pipeline import load_pipeline
from ..models.student import num_styles
from ..models.styles import StyleTable, parse_style, style_slugs
from .sampling import batches, check_generation_args, warn_if_cut

GRID_ROWS = 8  # the `--style all` grid shows the first pictures of each style


def default_model() -> tuple[str, str]:
    """The model to use when --model is not given, and where that choice came from."""
    if os.environ.get("DMM_MODEL"):
        return os.environ["DMM_MODEL"], "from $DMM_MODEL"
    last = state.last_model()
    if last is None:
        raise BadInput("no model given: pass --model, set DMM_MODEL, or run `dmm distill` first")
    return last, "the last model dmm distill wrote"


STDOUT = Path("-")


def output_paths(output: Path, names: list[str], overwrite: bool = False) -> list[Path]:
    """Where pictures go: `output` itself if it names a .png (one picture only) or is `-` (stdout, one picture
    only), else `names` inside it."""
    if output == STDOUT:
        if len(names) != 1:
            raise BadInput(f"--output -: writes one picture to stdout, and {len(names)} will be made; give a folder")
        if sys.stdout.isatty():
            raise BadInput("--output -: stdout is a terminal; send it to a file or a program (> cat.png, | display), "
                           "or give -o cat.png")
        return [STDOUT]
    if output.suffix.lower() == ".png":
        if len(names) != 1:
            raise BadInput(f"--output {output} names one file, but {len(names)} pictures will be made; give a folder")
        folder, paths = output.parent, [output]
    else:
        folder, paths = output, [output / name for name in names]
    if folder.exists() and not folder.is_dir() or not writable_folder(folder):
        raise BadInput(f"--output {output}: cannot write to {folder}")
    if not overwrite:
        taken = next((p for p in paths if p.exists()), None)
        if taken is not None:
            raise BadInput(f"--output: {taken} already exists; pass --overwrite to replace it, or choose another "
                           "--output")
    return paths


def request_digest(folder: Path, **settings) -> str:
    """8 hex digits that tell requests apart: the model folder and every setting that shapes the pictures."""
    key = json.dumps({"model": str(Path(folder).resolve()), **settings}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def run(prompt: str, *, model: str | None, style: str | None = None, negative: str | None = None, steps: int = 30,
        guidance: float = 7.5, seed: int = 0, width: int | None = None, height: int | None = None,
        num_images: int = 1, scheduler: str | None = None, output: Path = Path("dmm-out"), device: str = "auto",
        dtype: str = "auto", attention: str = "auto", batch_size: int = 8, overwrite: bool = False,
        loras: list[str] = (), allow_pickle: bool = False,
        on_written: Callable[[Path], None] | None = None) -> list[Path]:
    """Make `num_images` pictures per requested style and return the files written (a grid last for `all`);
    `loras` (REF[:SCALE]) are fused into the model in memory; `on_written` hears of each file as soon as it is on
    disk."""
    check_generation_args(steps=steps, guidance=guidance, width=width, height=height, num_images=num_images,
                          batch_size=batch_size, seed=seed)
    ref, source = (model, "") if model else default_model()
    ref, specs = lora.split_ref(ref)
    specs += [lora.parse_lora(text) for text in loras]
    try:
        folder = references.resolve(ref)
    except BadInput as e:  # a model the user did not type here says where it came from
        raise e if not source else type(e)(f"{e} ({source})") from None
    notes = [n for n in (source, str(folder) if str(folder) != ref else "") if n]
    console.say(f"model: {ref}" + (f" ({'; '.join(notes)})" if notes else ""))
    table = StyleTable.read(folder)
    if style is not None and table is None:
        raise BadInput(f"--style: {ref} has no styles (it is not a DMM student)")
    if style is None and table is not None:
        raise BadInput(f"{ref} is a DMM student: pick a style with --style (one of {', '.join(table.names)}, "
                       "an index, `all`, or a mix like a:0.5,b:0.5)")
    styles = parse_style(style, table.names) if table is not None else [(None, None)]
    added = lora.load_loras(specs, folder, ref, allow_pickle)  # after the cheap checks: a Hub LoRA downloads

    digest = request_digest(folder, loras=[[x.sha256, x.spec.scale] for x in added], prompt=prompt,
                            negative=negative, steps=steps, guidance=guidance, scheduler=scheduler, width=width,
                            height=height)
    stem, width_k = f"{slug(prompt)}-{digest}", max(3, len(str(num_images - 1)))
    labels = style_slugs([label for label, _ in styles], table.names) if table is not None else [None]
    names = [f"{stem}{'-' + label if label else ''}-s{seed}-{k:0{width_k}d}.png" for label in labels
             for k in range(num_images)]
    want_grid = style is not None and style.strip() == "all"
    paths = output_paths(Path(output), names + ([f"{stem}-s{seed}-styles.png"] if want_grid else []), overwrite)

    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    pipe = load_pipeline(folder, torch_device, torch_dtype, scheduler=scheduler, attention=attention)
    lora.fuse_pipeline(pipe, added)
    warn_if_cut(pipe, "prompt", prompt)
    warn_if_cut(pipe, "--negative prompt", negative)
    if table is not None and num_styles(pipe.unet) != len(table.names):
        raise BadInput(f"{folder}: styles.json lists {len(table.names)} styles but the UNet takes "
                       f"{num_styles(pipe.unet)}")
    written, shown = [], []
    targets = iter(paths)
    for _, vector in styles:
        kept = []
        for batch in batches(pipe, [prompt] * num_images, negative=negative, steps=steps, guidance=guidance,
                             seed=seed, width=width, height=height, style=vector, batch_size=batch_size):
            for image in batch:
                target = next(targets)
                if target == STDOUT:  # the PNG's bytes are the output, so no path is reported
                    png = io.BytesIO()
                    image.save(png, format="PNG")
                    console.result_bytes(png.getvalue())
                    continue
                with deferred():  # a picture on disk is a picture reported
                    written.append(save_png(image, target))
                    if on_written is not None:
                        on_written(written[-1])
            kept += batch[:max(0, GRID_ROWS - len(kept))]
        shown.append(kept)
    if want_grid:
        # one column per style, one row per picture
        rows = len(shown[0])
        images = [shown[s][k] for k in range(rows) for s in range(len(styles))]
        labels = [styles[s][0] for k in range(rows) for s in range(len(styles))]
        written.append(save_png(grid(images, labels, columns=len(styles)), next(targets)))
        if on_written is not None:
            on_written(written[-1])
    return written
