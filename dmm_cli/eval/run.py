"""`dmm eval`: the paper's FID_t protocol (§4.1), CLIP score, plug-ins' measures, and a report.

M(i, j) = FID(model samples under style i, teacher j samples), on the same prompts; FID_t = trace(M).
The reference row compares each teacher with itself under other seeds; its FID_t is the upper bound.
A model without styles (a weight merge, a single teacher) has one sample set, compared with every
teacher: its M is one row and its "diagonal" is that row.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import console
from ..data.prompts import read_prompts, shared_prompts
from ..errors import BadInput
from ..files.atomic import atomic_file, writable_folder
from ..files.images import unique_slugs
from ..generate.samples import SampleSet, SamplerSettings, sample_set
from ..models import lora
from ..models.folders import check_text_to_image
from ..models.styles import StyleTable, one_hot
from ..recipe import load_recipe
from .clip import DEFAULT_CLIP, clip_score, resolve_clip
from .features import feature_space, features_of
from .fid import fid_matrix, kid
from .measures import measures_for
OTHER_SEEDS = 1_000_003  # offset of the seeds of the reference and of evaluated models
SCHEMA = "dmm-eval/1"
MISSING_GLYPH = re.compile(r"Glyph .* missing from font")  # matplotlib's warning, as warnings' filters match it


@dataclass
class Row:
    name: str
    kind: str  # reference | student | model
    sets: list[SampleSet]  # one per style, or a single one
    M: list[list[float]] = field(default_factory=list)
    extras: dict = field(default_factory=dict)

    @property
    def diag(self) -> list[float]:
        return [self.M[i][i] for i in range(len(self.M))] if len(self.M) > 1 else list(self.M[0])

    @property
    def fid_t(self) -> float:
        return float(sum(self.diag))

    def kid_diag(self, real: list[torch.Tensor], fake: list[torch.Tensor]) -> list[float]:
        """KID of the pairs on M's diagonal (a model without styles: its one set against every teacher)."""
        pairs = zip(real, fake) if len(fake) > 1 else ((r, fake[0]) for r in real)
        return [kid(r, f) for r, f in pairs]


DEFAULTS = {"num_images": 50, "steps": 25, "guidance": 7.5, "features": "auto", "scheduler": None, "negative": None}
PROTOCOLS = {
    # The released DMM inference settings (its inference.py): DPM++ with Karras sigmas, 25 steps, guidance 7, this
    # negative prompt, and the paper's K of 5,000 samples per style with Inception features. Not matched: the paper's
    # prompts are 5,000 COCO captions, which dmm does not ship (give them with --prompts), and its seeds are not
    # published.
    "paper": {"num_images": 5000, "steps": 25, "guidance": 7.0, "features": "inception", "scheduler": "dpm++-karras",
              "negative": "worst quality,low quality,normal quality,lowres,watermark,nsfw"},
}


def settings_for(protocol: str | None, given: dict) -> dict:
    """Eval settings: the ones given, else the protocol's, else dmm's defaults."""
    if protocol is not None and protocol not in PROTOCOLS:
        raise BadInput(f"--protocol: unknown protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    preset = PROTOCOLS.get(protocol, {})
    return {k: given[k] if given.get(k) is not None else preset.get(k, default) for k, default in DEFAULTS.items()}


def parse_style_map(spec: str | None) -> dict[str, str]:
    """`--style-map style-0=anime,style-1=realism`: a student's style names → the recipe's teacher names."""
    if not spec:
        return {}
    pairs = [part.partition("=") for part in spec.split(",")]
    if any(not a.strip() or not sep or not b.strip() for a, sep, b in pairs):
        raise BadInput(f"--style-map {spec!r}: expected style=teacher pairs separated by commas")
    styles = [a.strip() for a, _, _ in pairs]
    twice = next((a for a in styles if styles.count(a) > 1), None)
    if twice:
        raise BadInput(f"--style-map {spec!r}: style {twice!r} is paired twice")
    return {a.strip(): b.strip() for a, _, b in pairs}


def style_order(ref: str, styles: list[str], teachers: list[str], recipe: Path, style_map: dict[str, str]
                ) -> list[int]:
    """For each recipe teacher, the index of the student's style of the same name (after `style_map`)."""
    unknown = sorted(set(style_map) - set(styles))
    if unknown:
        raise BadInput(f"--style-map: {ref} has no style {unknown[0]!r} (its styles: {', '.join(styles)})")
    named = [style_map.get(s, s) for s in styles]
    shared = next((n for n in named if named.count(n) > 1), None)
    if shared:
        pair = [s for s, n in zip(styles, named) if n == shared]
        raise BadInput(f"{ref}: its styles {pair[0]!r} and {pair[1]!r} both pair with the teacher {shared!r}; each "
                       "teacher takes one style (--style-map style=teacher,...)")
    if sorted(named) != sorted(teachers):
        raise BadInput(f"{ref}: its styles ({', '.join(named)}) are not {recipe}'s teachers ({', '.join(teachers)}); "
                       "pair them by name with --style-map style=teacher,...")
    return [named.index(t) for t in teachers]


def check_not_trained_on(ref: str, table: StyleTable | None, prompts: list[str]) -> None:
    """Refuse eval prompts whose teacher pictures the student trained on: its FID would reward recall."""
    clash = shared_prompts(prompts, table.synthesis_prompt_digests) if table else []
    if clash:
        raise BadInput(f"{ref} was trained on its teachers' pictures of the eval prompt {clash[0]!r} (synthesized "
                       "data), so its FID there would measure recall of training pictures; evaluate with other "
                       "--prompts")


def warn_of_cut_prompts(teacher: Path, prompts: list[str], negative: str | None) -> None:
    """Prompts past the text encoder's length are cut by every pipeline alike: fair to FID, but say so once."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(teacher / "tokenizer")
    limit = tokenizer.model_max_length
    distinct = list(dict.fromkeys(prompts))
    cut = [p for p in distinct if len(tokenizer(p).input_ids) > limit]
    if cut:
        runs, are = ("runs", "is") if len(cut) == 1 else ("run", "are")
        console.warn(f"eval: {len(cut)} of the {len(distinct)} prompts {runs} past the text encoder's {limit} "
                     f"tokens and {are} read only that far, such as {cut[0]!r}")
    if negative and len(tokenizer(negative).input_ids) > limit:
        console.warn(f"eval: the --negative prompt runs past the text encoder's {limit} tokens and is read only that "
                     "far")


def evaluate(models: list[str], recipe_path: Path, *, prompts_file: Path | None = None, num_images: int = 50,
             seed: int = 0, steps: int = 25, guidance: float = 7.5, batch_size: int = 16, features: str = "auto",
             clip: str | None = None, output: Path = Path("eval-out"), device: str = "auto", dtype: str = "auto",
             scheduler: str | None = None, style_map: dict[str, str] | None = None, negative: str | None = None,
             protocol: str | None = None) -> dict:
    """Sample, measure and report; returns the metrics dict also written to `output/metrics.json`."""
    from ..generate.sampling import SYNTHESIS_SEEDS, check_generation_args
    from ..models.devices import pick_device, pick_dtype
    from ..models.pipeline import load_pipeline

    if num_images < 2:
        raise BadInput(f"--num-images must be at least 2: FID needs two samples or more (got {num_images})")
    check_generation_args(steps=steps, guidance=guidance, width=None, height=None, num_images=num_images,
                          batch_size=batch_size, seed=seed, seed_span=OTHER_SEEDS, seed_limit=SYNTHESIS_SEEDS)
    if not writable_folder(output):  # before the sampling, not after it
        raise BadInput(f"--output {output}: cannot write a report folder there")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir()) and not (output / "metrics.json").is_file()):
        raise BadInput(f"--output {output}: exists and is not a dmm eval report folder, whose files a report would "
                       "replace; choose another --output")
    recipe = load_recipe(recipe_path)
    teacher_refs = [t.ref for t in recipe.teachers]
    names = [t.name for t in recipe.teachers]
    prompts = read_prompts(prompts_file, teacher_refs)
    prompts = [prompts[k % len(prompts)] for k in range(num_images)]
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    space = feature_space(features, teacher_refs, torch_device)

    model_dirs = [lora.resolve(m) for m in models]
    given: dict[Path, str] = {}
    for ref, folder in zip(models, model_dirs):  # two rows of one model would only share their picture files
        real = folder.resolve()
        if real in given:
            raise BadInput(f"{ref}: the same model as {given[real]}, given twice")
        given[real] = ref
    tables = [StyleTable.read(d) for d in model_dirs]
    orders = [None if t is None else style_order(ref, t.names, names, recipe_path, style_map or {})
              for ref, t in zip(models, tables)]
    for ref, table in zip(models, tables):
        check_not_trained_on(ref, table, prompts)
    clip_folder = resolve_clip(clip)  # after the cheap checks: the default CLIP is a 1.7 GB download
    teacher_dirs = [lora.resolve(r) for r in teacher_refs]
    for folder in model_dirs + teacher_dirs:  # before any sampling
        check_text_to_image(folder)
    warn_of_cut_prompts(teacher_dirs[0], prompts, negative)

    def loader(folder: Path):
        cache = {}

        def pipe_for():
            if "pipe" not in cache:
                cache["pipe"] = load_pipeline(folder, torch_device, torch_dtype, scheduler=scheduler,
                                              attention="auto")
            return cache["pipe"]
        return pipe_for

    teacher_settings = SamplerSettings(steps, guidance, seed, scheduler, negative=negative)
    other_settings = SamplerSettings(steps, guidance, seed + OTHER_SEEDS, scheduler, negative=negative)
    teacher_sets = [sample_set(loader(d), d, None, prompts, teacher_settings, batch_size, f"teacher {n}")
                    for d, n in zip(teacher_dirs, names)]
    rows = [Row("reference", "reference",
                [sample_set(loader(d), d, None, prompts, other_settings, batch_size, f"reference {n}")
                 for d, n in zip(teacher_dirs, names)])]
    for ref, folder, table, order in zip(models, model_dirs, tables, orders):
        pipe_for = loader(folder)
        if table is not None:  # the student's style of each teacher's name, in the recipe's order
            sets = [sample_set(pipe_for, folder, one_hot(i, len(table.names)), prompts, other_settings, batch_size,
                               f"{ref} style {table.names[i]}") for i in order]
            rows.append(Row(ref, "student", sets))
        else:
            rows.append(Row(ref, "model", [sample_set(pipe_for, folder, None, prompts, other_settings, batch_size,
                                                      ref)]))

    console.say(f"eval: FID in the {space.name} feature space")
    real = [features_of(s, space) for s in teacher_sets]
    if num_images < space.num_features:
        console.warn(f"eval: K = {num_images} samples is below the {space.num_features} feature dimensions, so FID's "
                     "covariances are singular and FID depends on K: compare FIDs only at equal K, or read KID")
    for row in rows:
        fake = [features_of(s, space) for s in row.sets]
        row.M = fid_matrix(real, fake)
        row.extras["kid_diag"] = row.kid_diag(real, fake)
        for measure in measures_for(teacher_refs):
            row.extras.update(measure.measure(row.sets, teacher_refs))
        if clip_folder is not None:
            row.extras["clip_score"] = clip_score(row.sets, clip_folder)

    reference_fid_t = rows[0].fid_t
    metrics = {
        "schema": SCHEMA,
        "teachers": [{"name": n, "ref": r} for n, r in zip(names, teacher_refs)],
        "settings": {"num_images": num_images, "seed": seed, "steps": steps, "guidance": guidance,
                     "negative": negative, "scheduler": scheduler or "each model's own", "features": space.name,
                     "feature_dims": space.num_features, "prompts": str(prompts_file or "default"),
                     "distinct_prompts": len(set(prompts)),
                     "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
                     "protocol": protocol, "k_below_feature_dims": num_images < space.num_features,
                     "clip": (clip or DEFAULT_CLIP) if clip_folder is not None else None},
        "models": [{
            "name": row.name, "kind": row.kind, "M": row.M, "diag": row.diag, "fid_t": row.fid_t,
            "fid_t_over_reference": row.fid_t / reference_fid_t if reference_fid_t else None,
            "kid_diag": row.extras["kid_diag"], "kid_t": sum(row.extras["kid_diag"]),
            "clip_score": row.extras.get("clip_score"),
            "style_accuracy": row.extras.get("style_accuracy"),
            "colour_accuracy": row.extras.get("colour_accuracy"),
        } for row in rows],
    }
    write_report(metrics, rows, names, Path(output))
    return metrics


def write_report(metrics: dict, rows: list[Row], names: list[str], output: Path) -> Path:
    from .report import heatmap, markdown, sample_grid

    output.mkdir(parents=True, exist_ok=True)
    pictures = []
    with warnings.catch_warnings(record=True) as caught:  # other warnings keep their filters and are shown again
        warnings.filterwarnings("always", MISSING_GLYPH.pattern)
        for row, entry, stem in zip(rows, metrics["models"], unique_slugs([row.name for row in rows])):
            pictures.append({"heatmap": heatmap(entry, names, output / f"heatmap-{stem}.png"),
                             "grid": sample_grid(row, names, output / f"samples-{stem}.png")})
    glyphs = [w for w in caught if MISSING_GLYPH.match(str(w.message))]  # matplotlib's, one per character
    for w in caught:
        if w not in glyphs:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if glyphs:
        console.warn("eval: the plotting font has no glyphs for some characters of the style names; the heatmaps "
                     "show them as boxes (report.md has the names)")
    with atomic_file(output / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    report = output / "report.md"
    with atomic_file(report) as tmp:
        tmp.write_text(markdown(metrics, pictures, output), encoding="utf-8")
    return report
