"""Build the toy zoo from nothing: data, VAE, base model, style teachers, and the style classifier.

Deterministic for a given seed and thread count. The shipped zoo was built with `dmm toy build`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from torch.nn import functional as F

from .. import console
from ..errors import BadInput
from ..files.atomic import atomic_folder, writable_folder
from ..generate.sampling import generate
from . import classifier as style_classifier
from . import components, loras, shapes, xl
from .training import progress, save_model, text_conditioning, train_denoiser

SHARED_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")


@dataclasses.dataclass
class BuildPlan:
    images_per_pair: int = 48
    vae_steps: int = 800
    base_steps: int = 2000
    teacher_steps: int = 300
    lora_steps: int = 600
    lora_lr: float = 5e-3
    batch: int = 32
    lr: float = 1e-3
    caption_dropout: float = 0.1
    sample_steps: int = 20
    guidance: float = 4.0
    check_per_pair: int = 6
    classifier_train_per_style: int = 240
    classifier_test_per_style: int = 120
    classifier_steps: int = 600

    @classmethod
    def reduced(cls) -> "BuildPlan":
        """A few steps of everything: proves the builder runs, not that the zoo is good."""
        return cls(images_per_pair=2, vae_steps=3, base_steps=3, teacher_steps=2, lora_steps=2, batch=8,
                   check_per_pair=1, classifier_train_per_style=8, classifier_test_per_style=4, classifier_steps=3,
                   sample_steps=2)


def train_vae(images: torch.Tensor, plan: BuildPlan, seed: int):
    torch.manual_seed(seed)
    vae = components.vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=plan.lr)
    gen = torch.Generator().manual_seed(seed)
    with progress(plan.vae_steps, "vae") as bar:
        for _ in range(plan.vae_steps):
            x = images[torch.randint(0, len(images), (plan.batch,), generator=gen)]
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()
    vae.eval().requires_grad_(False)
    with torch.inference_mode():
        latents = torch.cat([vae.encode(c).latent_dist.mode() for c in images.split(256)])
    # Stable Diffusion's convention: scale latents to unit variance for the UNet.
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return vae


def _pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=components.scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _samples(pipe, pairs, per_pair, seed, plan: BuildPlan):
    prompts = [shapes.caption(c, s) for c, s in pairs for _ in range(per_pair)]
    return generate(pipe, prompts, steps=plan.sample_steps, guidance=plan.guidance, seed=seed, batch_size=64), prompts


def colour_following(images, prompts) -> float:
    hits = sum(shapes.dominant_colour(img) == prompt.split()[1] for img, prompt in zip(images, prompts))
    return hits / len(prompts)


def build_folder(output: Path, seed: int = 0, plan: BuildPlan | None = None, overwrite: bool = False) -> dict:
    """`build` into `output` as one atomic folder: a half-built zoo never sits there, and a folder already there is
    replaced only if it is a zoo and `overwrite` is given."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise BadInput(f"--output {output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not (output / "zoo.json").is_file():
            raise BadInput(f"--output {output}: exists and is not a toy zoo; choose another --output")
        if not overwrite:
            raise BadInput(f"--output {output}: already holds a toy zoo; pass --overwrite to build it again")
    if not writable_folder(output):
        raise BadInput(f"--output {output}: cannot write a folder there")
    with atomic_folder(output) as tmp:
        return build(tmp, seed, plan)


def build(out: Path, seed: int = 0, plan: BuildPlan | None = None) -> dict:
    """Build the whole zoo under `out` and return its manifest (also written to `out/zoo.json`)."""
    plan = plan or BuildPlan()
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pairs = shapes.all_pairs()
    data = {style: shapes.dataset(style, pairs, plan.images_per_pair, seed) for style in shapes.STYLES}
    pixels = {style: style_classifier.to_pixels([img for img, _ in items]) * 2 - 1 for style, items in data.items()}

    console.say("toy zoo: training the VAE")
    vae = train_vae(torch.cat(list(pixels.values())), plan, seed)
    with torch.inference_mode():
        latents = {s: torch.cat([vae.encode(c).latent_dist.mode() for c in p.split(256)]) * vae.config.scaling_factor
                   for s, p in pixels.items()}

    tokenizer = components.tokenizer()
    torch.manual_seed(seed)
    text_encoder = components.text_encoder(tokenizer)
    captions = {s: [c for _, c in items] for s, items in data.items()}

    console.say("toy zoo: training the base model")
    condition = text_conditioning(text_encoder, tokenizer, captions[shapes.BASE_STYLE])
    base_unet = train_denoiser(components.unet(), condition, latents[shapes.BASE_STYLE], plan.base_steps, plan, seed,
                               "base", text_encoder.parameters())
    base_pipe = _pipeline(vae, text_encoder, tokenizer, base_unet)
    save_model(base_pipe, out / "base", {})

    teacher_pipes = {}
    for i, style in enumerate(shapes.TEACHER_STYLES):
        console.say(f"toy zoo: fine-tuning teacher {style!r}")
        unet = components.unet()
        unet.load_state_dict(base_unet.state_dict())
        unet = train_denoiser(unet, text_conditioning(text_encoder, tokenizer, captions[style]), latents[style],
                              plan.teacher_steps, plan, seed + 1 + i, style)
        teacher_pipes[style] = _pipeline(vae, text_encoder, tokenizer, unet)
        save_model(teacher_pipes[style], out / style, {part: f"base/{part}" for part in SHARED_PARTS})

    console.say("toy zoo: training a LoRA per style")
    lora_manifest = loras.derive(out, plan, seed)
    xl_manifest = xl.build(out, plan, seed)

    console.say("toy zoo: measuring the base model's colour following")
    images, prompts = _samples(base_pipe, pairs, plan.check_per_pair, seed + 1000, plan)
    base_colour = colour_following(images, prompts)

    console.say("toy zoo: training the style classifier on generations")
    all_pipes = {shapes.BASE_STYLE: base_pipe, **teacher_pipes}
    per_pair_train = max(1, plan.classifier_train_per_style // len(pairs))
    per_pair_test = max(1, plan.classifier_test_per_style // len(pairs))
    train_x, train_y, test_x, test_y = [], [], [], []
    teacher_colour = {}
    for label, (style, pipe) in enumerate(all_pipes.items()):
        imgs, _ = _samples(pipe, pairs, per_pair_train, seed + 2000, plan)
        train_x.append(style_classifier.to_pixels(imgs))
        train_y += [label] * len(imgs)
        imgs, held_prompts = _samples(pipe, pairs, per_pair_test, seed + 3000, plan)  # other seeds: held out
        test_x.append(style_classifier.to_pixels(imgs))
        test_y += [label] * len(imgs)
        teacher_colour[style] = colour_following(imgs, held_prompts)
    torch.manual_seed(seed)
    clf = style_classifier.StyleClassifier(list(all_pipes))
    clf = style_classifier.train(clf, torch.cat(train_x), torch.tensor(train_y), plan.classifier_steps, seed)
    predicted = style_classifier.predict(clf, torch.cat(test_x)).argmax(-1)
    accuracy = float((predicted == torch.tensor(test_y)).float().mean())
    clf.save(out / "classifier")

    manifest = {
        "seed": seed,
        "plan": dataclasses.asdict(plan),
        "base": "base",
        "teachers": list(shapes.TEACHER_STYLES),
        "colours": list(shapes.COLOURS),
        "shapes": list(shapes.SHAPES),
        "held_out_pairs": [list(p) for p in shapes.HELD_OUT],
        "loras": lora_manifest,
        "xl": xl_manifest,
        "measured": {
            "base_colour_following": round(base_colour, 4),
            "teacher_colour_following": {k: round(v, 4) for k, v in teacher_colour.items()},
            "classifier_held_out_accuracy": round(accuracy, 4),
            "build_seconds": round(time.perf_counter() - started, 1),
            "torch_threads": torch.get_num_threads(),
        },
    }
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
