"""The `dmm` command line: parse, call the core, print. Results on stdout, everything else on stderr."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import __version__, console
from .errors import BadInput

app = typer.Typer(
    name="dmm",
    help="Merge fine-tuned Stable Diffusion checkpoints into one style-promptable model by distillation (DMM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
toy_app = typer.Typer(help="The offline toy zoo: a tiny SD-shaped model family for demos and tests.",
                      no_args_is_help=True)
app.add_typer(toy_app, name="toy")


def _output_path(value: str) -> Path:
    """An output path; an empty one (`-o "$UNSET"`) is refused rather than taken for the current folder."""
    if not value:
        raise typer.BadParameter("is empty")
    return Path(value)


OUTPUT_PATH = {"parser": _output_path, "metavar": "<path>"}


def _version(value: bool) -> None:
    if value:
        console.result(__version__)
        raise typer.Exit()


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No logs or progress bars on stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    console.set_quiet(quiet)


@app.command()
def fetch(
    refs: list[str] = typer.Argument(..., metavar="REF...",
                                     help="toy:<name>, a local folder or .safetensors file, org/name[@revision], "
                                          "or org/name/sub/file.safetensors; MODEL+LORA[:SCALE] fuses the LoRAs "
                                          "into a cached folder."),
    store: Optional[Path] = typer.Option(None, "--store", **OUTPUT_PATH,
                                         help="Download into this folder instead of the Hugging Face cache."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit for refs without @rev."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Prefer this weights variant, e.g. fp16."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin/.ckpt weights (loaded with "
                                                                    "weights_only=True, then kept as safetensors)."),
    export_single_file: Optional[Path] = typer.Option(None, "--export-single-file", **OUTPUT_PATH,
                                                      help="Also write the (one) model as a single original-layout "
                                                           ".safetensors file for A1111 / ComfyUI."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON manifest (ref, folder, source, commit)."),
    prediction_type: Optional[str] = typer.Option(None, "--prediction-type",
                                                  help="What a foreign single-file checkpoint predicts (epsilon, "
                                                       "v_prediction, sample), when no .yaml config beside it says."),
    lora: bool = typer.Option(False, "--lora", help="The REFs are LoRAs: print each one's local .safetensors file "
                                                    "(or folder); a pickle one, with --allow-pickle, is kept as "
                                                    "safetensors."),
) -> None:
    """Resolve model references to local diffusers folders (downloading what is missing); print one per line.

    Only what an SD pipeline needs is downloaded, safetensors first, each LFS file checked against the
    Hub's sha256. HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE are honoured. Single-file checkpoints are
    converted to diffusers layout offline.

    \b
    Examples:
      dmm fetch toy:base toy:night
      dmm fetch stable-diffusion-v1-5/stable-diffusion-v1-5 --variant fp16
      dmm fetch SG161222/Realistic_Vision_V5.1_noVAE@main --store ./models
      dmm fetch ./sd15-finetune.safetensors
      dmm fetch toy:base+toy:night-lora:0.8
      dmm fetch --lora org/style-lora org/other-loras/watercolor.safetensors
    """
    import json
    from dataclasses import asdict

    from .models.lora import fetch_lora, fetch_model

    if lora:
        if export_single_file is not None or variant is not None or store is not None:
            raise BadInput("--lora fetches LoRA files: --export-single-file, --variant and --store are for models")
        paths = [fetch_lora(ref, allow_pickle) for ref in refs]
        if as_json:
            console.result(json.dumps([{"ref": r, "path": str(p)} for r, p in zip(refs, paths)], indent=2))
        else:
            for path in paths:
                console.result(str(path))
        return
    if export_single_file is not None and len(refs) != 1:
        raise BadInput("--export-single-file takes exactly one REF")
    manifest = [fetch_model(ref, revision=revision, allow_pickle=allow_pickle, variant=variant, store=store,
                            prediction_type=prediction_type) for ref in refs]
    if export_single_file is not None:
        from .export.run import export

        console.warn("--export-single-file has moved to `dmm export MODEL --single-file -o FILE`; it still works here")
        export(refs[0], single_file=True, output=export_single_file, overwrite=True)
    if as_json:
        console.result(json.dumps([asdict(m) for m in manifest], indent=2))
    else:
        for m in manifest:
            console.result(m.folder)
        if export_single_file is not None:
            console.result(str(export_single_file))


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to draw."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Model reference (toy:<name> or a folder). Default: $DMM_MODEL, "
                                             "else the last model `dmm distill` wrote."),
    style: Optional[str] = typer.Option(None, "--style", "-s",
                                        help="For a DMM student: an index (3), a name (anime), `all` (one picture "
                                             "per style plus a grid), or a mix (anime:0.7,realism:0.3)."),
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt."),
    steps: int = typer.Option(30, "--steps", help="Sampling steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale (1 disables it)."),
    seed: int = typer.Option(0, "--seed", help="Seed; image i uses seed+i, so a seed always gives the same image."),
    width: Optional[int] = typer.Option(None, "--width", help="Width in pixels, a multiple of 8. Default: the model's."),
    height: Optional[int] = typer.Option(None, "--height", help="Height in pixels, a multiple of 8. Default: the model's."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Pictures to make."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler",
                                            help="ddim, ddpm, pndm, euler, euler-a, dpm++ or dpm++-karras. "
                                                 "Default: the model's own."),
    output: Path = typer.Option(Path("dmm-out"), "--output", "-o", **OUTPUT_PATH,
                                help="Folder for the PNGs, or a .png file name for a single picture, or - to "
                                     "write a single picture's PNG to stdout."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16."),
    attention: str = typer.Option("auto", "--attention",
                                  help="auto (on CUDA, the fastest of SDPA's flash, cudnn and efficient kernels "
                                       "and xformers, timed once on this model's shapes), sdpa, flash, cudnn, "
                                       "efficient, xformers."),
    batch_size: int = typer.Option(8, "--batch-size", help="Pictures per forward pass."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace pictures that already exist."),
    loras: list[str] = typer.Option([], "--lora", help="A LoRA fused into the model, REF[:SCALE] (scale default 1; "
                                                        "repeatable): a kohya/A1111 file, a diffusers/PEFT folder, "
                                                        "org/name[/file.safetensors] on the Hub, or toy:<style>-lora."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept a pickle (.ckpt/.pt/.bin) LoRA, loaded "
                                                                    "with weights_only=True."),
) -> None:
    """Generate pictures with a Stable Diffusion family model and print their paths, each as it is written.

    File names carry the prompt, a digest of the request (model, prompts, sampler, size) and the seed,
    so different requests never collide; an existing picture is replaced only with --overwrite.

    \b
    Examples:
      dmm generate "a red circle" --model toy:night --num-images 4
      dmm generate --style all "a red circle"          # after dmm distill: one picture per style
      dmm generate --style night:0.7,outline:0.3 "a blue square" --model runs/toy_styles
      dmm generate "a cat" --model ./sd15 --steps 25 --scheduler dpm++ -o cat.png
      dmm generate "a cat" --model ./sd15 -o - | convert - -resize 50% small-cat.jpg   # the PNG on stdout
      dmm generate "a red circle" --model toy:base --lora toy:night-lora:0.8 --lora toy:stripes-lora:0.5
    """
    from .generate.run import run

    run(prompt, model=model, style=style, negative=negative, steps=steps, guidance=guidance, seed=seed, width=width,
        height=height, num_images=num_images, scheduler=scheduler, output=output, device=device, dtype=dtype,
        attention=attention, batch_size=batch_size, overwrite=overwrite, loras=loras, allow_pickle=allow_pickle,
        on_written=lambda path: console.result(str(path)))


@app.command()
def distill(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", **OUTPUT_PATH,
                                          help="Run folder. Default: the recipe's output."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a run folder of this recipe."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Shorthand for --set train.max_steps=N."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe field: --set train.lr=2e-5 (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate recipe, models and data; print the plan; train nothing."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the plan as JSON."),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", min=1,
                                                help="With --dry-run: plan for this many GPUs (default: the "
                                                     "launcher's, or 1)."),
) -> None:
    """Distill the recipe's teachers into one style-promptable student; print the run folder.

    The run folder is a diffusers pipeline with styles.json, a model card, logs/ and checkpoints/.
    Ctrl-C saves a checkpoint; --resume continues exactly where it stopped.

    \b
    Examples:
      dmm distill recipes/toy_styles.yaml
      dmm distill recipes/anime_realism.yaml --dry-run
      dmm distill recipes/toy_styles.yaml --max-steps 200 --set train.lr=5e-4 -o runs/quick
      dmm distill recipes/xl_styles_8.yaml --dry-run --num-processes 8   # memory per GPU on 8 GPUs
      accelerate launch --num_processes 4 -m dmm_cli distill recipes/anime_realism.yaml   # several GPUs
    """
    import json

    from . import distill as distill_mod

    if num_processes is not None and not dry_run:
        raise BadInput("--num-processes plans a run (--dry-run); to run on several GPUs, launch dmm with "
                       "accelerate launch --num_processes N or torchrun")
    plan = distill_mod.plan_run(recipe, overrides, output=output, max_steps=max_steps, resume=resume,
                                overwrite=overwrite, processes=num_processes)
    if dry_run:
        description = plan.describe()
        if as_json:
            console.result(json.dumps(description, indent=2))
        else:
            console.result(distill_mod.plan_text(description))
        return
    try:
        folder = distill_mod.run(plan)
    except KeyboardInterrupt as stop:  # the launcher's stop signal, landed while a lost process was being told
        lost = distill_mod.lost_process_behind(stop)
        if lost is None:
            raise
        raise lost from None
    from accelerate.state import PartialState

    if PartialState().is_main_process:
        console.result(str(folder))


@app.command("baseline-merge")
def baseline_merge(
    teachers: Optional[list[str]] = typer.Argument(None, metavar="[TEACHER...]",
                                                   help="Teacher model references; MODEL+LORA[:SCALE] for a LoRA "
                                                        "style (its update streamed in, never a full teacher)."),
    method: str = typer.Option("average", "--method",
                               help="average: Σwθ/Σw (default weights equal). task-arithmetic: base + λΣw(θ−base), "
                                    "λ default 1/N. ties: per tensor, keep each task vector's ⌈density·n⌉ largest "
                                    "magnitudes (ties at the threshold kept), elect the sign of Σwδ, average the "
                                    "kept entries that agree with it (a zero sign sum keeps the base value), base + "
                                    "λ·mean, λ default 1. dare: seeded Bernoulli(--density) keep-mask, rescale "
                                    "1/density, base + λΣwδ, λ default 1/N (1 with --dare-sign). Every method: a key "
                                    "missing in a teacher is an error; non-float tensors are copied from the base."),
    base: Optional[str] = typer.Option(None, "--base", help="The model the teachers were fine-tuned from "
                                                             "(needed by task-arithmetic, ties, dare)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Take base and teachers from a distill recipe."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated, one per teacher. Default: 1 each."),
    density: Optional[float] = typer.Option(None, "--density", help="ties: fraction kept per tensor; dare: keep "
                                                                    "probability. In (0, 1]. Default 0.2."),
    lam: Optional[float] = typer.Option(None, "--lambda", help="Scale of the merged task vector (see --method)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the DARE masks. Default 0."),
    dare_sign: bool = typer.Option(False, "--dare-sign", help="dare: add TIES' sign election."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Take the VAE from this model instead of the base."),
    dtype: str = typer.Option("auto", "--dtype", help="Output dtype: auto (per tensor, the widest of the inputs'), "
                                                      "fp32, fp16, bf16."),
    device: str = typer.Option("cpu", "--device", help="Compute on cpu or cuda."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", **OUTPUT_PATH,
                                          help="Output folder. Default: merged-METHOD."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder that dmm "
                                                              "baseline-merge wrote (never any other folder)."),
) -> None:
    """Merge teachers in weight space (the baselines DMM is compared with); print the output folder.

    Streams tensor by tensor, so memory stays small whatever the model size. Options a method does not
    use (--density with average, say) are refused.

    \b
    Examples:
      dmm baseline-merge toy:night toy:outline toy:stripes toy:checker -o runs/average
      dmm baseline-merge --method ties --recipe recipes/toy_styles.yaml --density 0.2 -o runs/ties
      dmm baseline-merge --method dare --base toy:base toy:night toy:outline --seed 3 -o runs/dare
      dmm baseline-merge --method ties --base toy:base toy:base+toy:night-lora toy:base+toy:stripes-lora:0.8
    """
    from .merge import baseline_merge as merge
    from .models.devices import DTYPES
    from .recipe import load_recipe

    teachers = list(teachers or [])
    if recipe is not None:
        if teachers:
            raise BadInput("give teachers either as arguments or with --recipe, not both")
        r = load_recipe(recipe)
        teachers, base = [t.ref for t in r.teachers], base or r.base
    if dtype != "auto" and dtype not in DTYPES:
        raise BadInput(f"--dtype: unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    try:
        weight_list = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        raise BadInput(f"--weights {weights!r}: expected comma-separated numbers") from None
    folder = merge(method, teachers, base=base, weights=weight_list, density=density, lam=lam, seed=seed,
                   dare_sign=dare_sign, output=output or Path(f"merged-{method}"), vae=vae,
                   dtype=None if dtype == "auto" else DTYPES[dtype], device=device, overwrite=overwrite)
    console.result(str(folder))


@app.command("export")
def export_(
    model: str = typer.Argument(..., metavar="MODEL", help="A dmm student (run folder or reference), or any model "
                                                          "for --single-file."),
    style: Optional[str] = typer.Option(None, "--style", "-s", help="Bake this style into a plain checkpoint: a name, "
                                                                    "an index, a mix (a:0.7,b:0.3), or `all` (one "
                                                                    "checkpoint per style)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", **OUTPUT_PATH,
                                          help="Folder (or .safetensors with --single-file; a folder of them for "
                                               "--style all). Default: named after the model and style."),
    single_file: bool = typer.Option(False, "--single-file", help="Write one original-layout .safetensors file, as "
                                                                   "A1111, ComfyUI and Forge load (a student: with "
                                                                   "--style, or --format dmm-official)."),
    fmt: str = typer.Option("diffusers", "--format", help="diffusers; dmm-official: the released MCG-NJU/DMM "
                                                          "layout (model_embedding + add_embedding) of a student, "
                                                          "with --single-file the file the ComfyUI-DMM nodes load; "
                                                          "lora (kohya/A1111 file) or lora-diffusers (a folder for "
                                                          "load_lora_weights): a LoRA student's style as a LoRA on "
                                                          "its base."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (as stored), fp32, fp16, bf16."),
    metrics: Optional[Path] = typer.Option(None, "--metrics", help="A `dmm eval` metrics.json whose figures go into "
                                                                   "the model card. Default: MODEL/eval/metrics.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an output that dmm export wrote."),
) -> None:
    """Use a merged model anywhere: bake a student's style into a plain checkpoint; print the written paths.

    A student adds its style embedding to the timestep embedding; for a fixed style or mix that is a
    constant, folded exactly into a bias, so the result is a plain SD model with no style input.

    \b
    Examples:
      dmm export runs/toy_styles --style night -o night/
      dmm export runs/toy_styles --style all --single-file -o styles/    # one file per style for A1111/ComfyUI
      dmm export runs/toy_styles --style night:0.5,checker:0.5 --single-file -o mix.safetensors
      dmm export runs/toy_styles --format dmm-official -o toy_styles-official/
      dmm export runs/toy_styles --format dmm-official --single-file -o dmm.safetensors   # ComfyUI-DMM
      dmm export ./sd15-folder --single-file -o sd15.safetensors
      dmm export runs/toy_styles_lora --style all --format lora -o loras/     # kohya files: ComfyUI, A1111, Forge
      dmm export runs/toy_styles_lora --style night --format lora-diffusers -o night-lora/
    """
    from .export.run import export
    from .models.devices import DTYPES

    if dtype != "auto" and dtype not in DTYPES:
        raise BadInput(f"--dtype: unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    for path in export(model, style=style, output=output, single_file=single_file, fmt=fmt,
                       dtype=None if dtype == "auto" else DTYPES[dtype], metrics=metrics, overwrite=overwrite):
        console.result(str(path))


@app.command("eval")
def eval_(
    models: list[str] = typer.Argument(..., metavar="MODEL...", help="Students, weight merges or single models."),
    recipe: Path = typer.Option(..., "--recipe", help="The recipe whose teachers are the FID references."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="One prompt per line. Default: the held-out "
                                                                    "captions for toy teachers, else shipped "
                                                                    "COCO-style captions. Prompts a student's "
                                                                    "synthesized data used are refused."),
    num_images: Optional[int] = typer.Option(None, "--num-images", "-k", help="Samples per style and per teacher "
                                                                              "(K ≥ 2). Default 50."),
    seed: int = typer.Option(0, "--seed", help="Teachers use seed+k; the reference and models use other seeds."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps. Default 25."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale. Default 7.5."),
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt for every sample."),
    batch_size: int = typer.Option(16, "--batch-size", help="Pictures per forward pass."),
    features: Optional[str] = typer.Option(None, "--features",
                                           help="auto (toy for toy teachers, else inception; the default), inception, "
                                                "pixels (no weights needed; not comparable with published FIDs), "
                                                "toy, or a path to the Inception weights file."),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP model for CLIP score: a local folder or a Hub "
                                                           "reference org/name[@revision] (fetched and verified like "
                                                           "models), or none. Default: openai/clip-vit-large-patch14 "
                                                           "when the Hub can be reached or it is cached."),
    output: Path = typer.Option(Path("eval-out"), "--output", "-o", **OUTPUT_PATH, help="Report folder."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16, bf16."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Sampler for every model (default: each own)."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="paper: the released DMM's sampling settings "
                                                                    "(DPM++ Karras, 25 steps, guidance 7, its negative "
                                                                    "prompt) and K = 5,000 Inception samples; options "
                                                                    "given explicitly win."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics.json to stdout instead of the report path."),
    style_map: Optional[str] = typer.Option(None, "--style-map", help="Pair a student's styles with the recipe's "
                                                                      "teachers when their names differ: "
                                                                      "style-0=anime,style-1=realism."),
) -> None:
    """Measure how faithfully each style survives (the paper's FID_t, with KID beside it) and write a report.

    Each student style is compared with the recipe teacher of the same name. Samples are cached, so
    re-running or adding a model regenerates nothing already made.

    \b
    Examples:
      dmm eval runs/toy_styles runs/ties runs/average --recipe recipes/toy_styles.yaml -k 100
      dmm eval runs/anime_realism --recipe recipes/anime_realism.yaml --clip openai/clip-vit-base-patch32 --json
      dmm eval converted/ --recipe recipes/anime_realism.yaml --style-map style-0=anime,style-1=realism
      dmm eval runs/anime_realism --recipe recipes/anime_realism.yaml --protocol paper --prompts coco-5k.txt
    """
    import json

    from .eval.run import evaluate, parse_style_map, settings_for

    chosen = settings_for(protocol, {"num_images": num_images, "steps": steps, "guidance": guidance,
                                     "features": features, "scheduler": scheduler, "negative": negative})
    metrics = evaluate(models, recipe, prompts_file=prompts, seed=seed, batch_size=batch_size, clip=clip,
                       output=output, device=device, dtype=dtype, style_map=parse_style_map(style_map),
                       protocol=protocol, **chosen)
    if as_json:
        console.result(json.dumps(metrics, indent=2))
    else:
        console.result(str(output / "report.md"))


@app.command()
def grid(
    images: list[Path] = typer.Argument(..., help="PNG files, in order."),
    output: Path = typer.Option(..., "--output", "-o", **OUTPUT_PATH, help="The grid PNG to write."),
    columns: Optional[int] = typer.Option(None, "--columns", help="Pictures per row. Default: all in one row."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated labels, one per picture."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file."),
) -> None:
    """Tile PNG files into one labelled grid and print its path.

    \b
    Example:
      dmm grid a.png b.png --labels night,outline -o grid.png
    """
    from .files.images import grid_file

    console.result(str(grid_file(images, output, labels.split(",") if labels else None, columns, overwrite)))


@toy_app.command("build")
def toy_build(
    output: Path = typer.Option(..., "--output", "-o", **OUTPUT_PATH, help="Folder to build the zoo in."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed on the same machine gives the same zoo."),
    reduced: bool = typer.Option(False, "--reduced", help="A few steps of everything (a smoke test)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a toy zoo already in --output (never any "
                                                              "other folder)."),
) -> None:
    """Build the toy zoo from scratch, its SDXL-shaped family included (about 20 minutes on 2 CPU cores), and print
    its folder.

    \b
    Example:
      dmm toy build -o /tmp/zoo && cat /tmp/zoo/zoo.json
    """
    from .toy.build import BuildPlan, build_folder

    build_folder(output, seed, BuildPlan.reduced() if reduced else None, overwrite)
    console.result(str(output))


@toy_app.command("list")
def toy_list(
    family: Optional[str] = typer.Option(None, "--family",
                                         help="sd (SD1.x-shaped) or xl (SDXL-shaped); default: both."),
) -> None:
    """Print the toy zoo's model references, one per line.

    \b
    Example:
      dmm toy list --family xl
    """
    from . import toy

    if family not in (None, "sd", "xl"):
        raise BadInput(f"--family: unknown family {family!r} (use sd or xl)")
    for name in toy.model_names(family=family):
        console.result(f"toy:{name}")
