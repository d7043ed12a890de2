"""`dmm generate` as a function: pick the model, check the arguments, make the pictures, write them."""
from __future__ import annotations

import os
from pathlib import Path

from .. import console
from ..errors import BadInput
from ..files import state
from ..files.atomic import writable_folder
from ..files.images import grid, save_png, slug
from ..models import references
from ..models.devices import pick_device, pick_dtype
from ..models.pipeline import load_pipeline
from ..models.student import StyleTable, num_styles, parse_style
from .sampling import check_generation_args, generate


def default_model() -> tuple[str, str]:
    """The model to use when --model is not given, and where that choice came from."""
    if os.environ.get("DMM_MODEL"):
        return os.environ["DMM_MODEL"], "from $DMM_MODEL"
    last = state.last_model()
    if last is None:
        raise BadInput("no model given: pass --model, set DMM_MODEL, or run `dmm distill` first")
    return last, "the last model dmm distill wrote"


def output_paths(output: Path, names: list[str]) -> list[Path]:
    """Where pictures go: `output` itself if it names a .png (one picture only), else `names` inside it."""
    if output.suffix.lower() == ".png":
        if len(names) != 1:
            raise BadInput(f"--output {output} names one file, but {len(names)} pictures will be made; give a folder")
        folder, paths = output.parent, [output]
    else:
        folder, paths = output, [output / name for name in names]
    if folder.exists() and not folder.is_dir() or not writable_folder(folder):
        raise BadInput(f"--output {output}: cannot write to {folder}")
    return paths


def run(prompt: str, *, model: str | None, style: str | None = None, negative: str | None = None, steps: int = 30,
        guidance: float = 7.5, seed: int = 0, width: int | None = None, height: int | None = None,
        num_images: int = 1, scheduler: str | None = None, output: Path = Path("dmm-out"), device: str = "auto",
        dtype: str = "auto", attention: str = "auto", batch_size: int = 8) -> list[Path]:
    """Make `num_images` pictures per requested style and return the files written (a grid last for `all`)."""
    check_generation_args(steps=steps, guidance=guidance, width=width, height=height, num_images=num_images,
                          batch_size=batch_size)
    ref, source = (model, "") if model else default_model()
    folder = references.resolve(ref)
    notes = [n for n in (source, str(folder) if str(folder) != ref else "") if n]
    console.say(f"model: {ref}" + (f" ({'; '.join(notes)})" if notes else ""))
    table = StyleTable.read(folder)
    if style is not None and table is None:
        raise BadInput(f"--style: {ref} has no styles (it is not a DMM student)")
    if style is None and table is not None:
        raise BadInput(f"{ref} is a DMM student: pick a style with --style (one of {', '.join(table.names)}, "
                       "an index, `all`, or a mix like a:0.5,b:0.5)")
    styles = parse_style(style, table.names) if table is not None else [(None, None)]

    stem = slug(prompt)
    names = [f"{stem}{'-' + slug(label) if label else ''}-s{seed}-{k:03d}.png" for label, _ in styles
             for k in range(num_images)]
    want_grid = style is not None and style.strip() == "all"
    paths = output_paths(Path(output), names + ([f"{stem}-s{seed}-styles.png"] if want_grid else []))

    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    pipe = load_pipeline(folder, torch_device, torch_dtype, scheduler=scheduler, attention=attention)
    if table is not None and num_styles(pipe.unet) != len(table.names):
        raise BadInput(f"{folder}: styles.json lists {len(table.names)} styles but the UNet takes "
                       f"{num_styles(pipe.unet)}")
    images = []
    for _, vector in styles:
        images += generate(pipe, [prompt] * num_images, negative=negative, steps=steps, guidance=guidance,
                           seed=seed, width=width, height=height, style=vector, batch_size=batch_size)
    written = [save_png(image, path) for image, path in zip(images, paths)]
    if want_grid:
        # one column per style, one row per picture
        order = [s * num_images + k for k in range(num_images) for s in range(len(styles))]
        labels = [styles[i // num_images][0] for i in order]
        written.append(save_png(grid([images[i] for i in order], labels, columns=len(styles)), paths[-1]))
    return written
