"""How the toy zoo plugs into dmm, through the registries any plug-in uses (entry point in pyproject.toml):

- model references `toy:<name>`;
- the image set `toy:shapes` for recipes' `data.folder`;
- its held-out captions as the default eval prompts for toy teachers, the other captions as synthesis prompts;
- the `toy` feature space (the style classifier's penultimate layer), `--features auto` for toy teachers;
- style and colour accuracy in eval reports;
- its configs and tokenizer as the template for importing toy single files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ..data.prompts import register_prompts
from ..data.sources import register_image_set
from ..errors import ModelError
from ..eval.features import FeatureSpace, register_feature_space
from ..eval.measures import register_measure
from ..files import state
from ..files.atomic import atomic_folder
from ..files.hashing import sha256_file
from ..files.text import read_json
from ..models.references import register_scheme
from ..models.single_file import register_config_template
from . import ZOO, classifier_folder, lora_names, lora_path, manifest, model_names

PREFIX = "toy:"
IMAGE_SET = "toy:shapes"
IMAGES_PER_PAIR = 12


def register() -> None:
    register_scheme("toy", model_folder, model_names, store=ZOO)
    register_image_set(IMAGE_SET, shapes_folder)
    register_prompts("eval", all_toy, held_out_captions)
    register_prompts("synthesis", all_toy, training_captions)
    register_feature_space("toy", lambda device: toy_space(), default_for=all_toy)
    register_measure("toy accuracies", all_toy, accuracies)
    register_config_template(lambda configs: is_toy_config(configs) and "text_encoder_2" in configs,
                             lambda: ZOO / manifest()["xl"]["base"])
    register_config_template(is_toy_config, lambda: ZOO / manifest()["base"])


def all_toy(teacher_refs: list[str]) -> bool:
    return all(ref.startswith(PREFIX) for ref in teacher_refs)


def model_folder(name: str) -> Path:
    """A toy model's folder, or a toy LoRA's file or folder."""
    if name in lora_names():
        return lora_path(name)
    names = model_names()
    if name not in names:
        raise ModelError(f"{PREFIX}{name}: no such toy model (the toy zoo has {', '.join(names)}, and the LoRAs "
                         f"{', '.join(lora_names())})")
    return ZOO / name


def shapes_folder() -> Path:
    """The toy zoo's image set, written on first use: like a web-scale set it mixes every rendering style,
    and it leaves the held-out colour/shape pairs out."""
    from . import shapes

    folder = state.home() / "toy-data" / f"shapes-all-styles-{IMAGES_PER_PAIR}"
    if (folder / "metadata.jsonl").is_file():
        return folder
    state.store("toy-data")
    with atomic_folder(folder, keep_existing=True) as tmp:
        lines = []
        items = [item for style in shapes.STYLES
                 for item in shapes.dataset(style, shapes.training_pairs(), IMAGES_PER_PAIR, seed=1234)]
        for k, (image, text) in enumerate(items):
            name = f"{k:05d}.png"
            image.save(tmp / name)
            lines.append(json.dumps({"file_name": name, "text": text}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def held_out_captions() -> list[str]:
    """The colour/shape pairs no training picture shows: eval measures styles on prompts never trained on."""
    from . import shapes

    return [shapes.caption(c, s) for c, s in shapes.HELD_OUT]


def training_captions() -> list[str]:
    from . import shapes

    return [shapes.caption(c, s) for c, s in shapes.training_pairs()]


def toy_space() -> FeatureSpace:
    from .classifier import StyleClassifier, to_pixels

    folder = classifier_folder()
    clf = StyleClassifier.load(folder)
    size = 32

    @torch.inference_mode()
    def extract(images):
        pixels = to_pixels([i.convert("RGB").resize((size, size), Image.BICUBIC) for i in images])
        return clf.features(pixels).double()

    return FeatureSpace("toy", "toy-" + sha256_file(folder / "model.safetensors")[:12], clf.head.in_features, extract)


def accuracies(sets, teacher_refs: list[str]) -> dict:
    """Style accuracy (classifier top-1 is the intended style) and prompt-colour accuracy."""
    from . import shapes
    from .classifier import StyleClassifier, predict, to_pixels

    teacher_styles = [style_of(ref) for ref in teacher_refs]
    clf = StyleClassifier.load(classifier_folder())
    hits = []
    colour_hits = colour_total = 0
    for i, samples in enumerate(sets):
        images = samples.images()
        predicted = [clf.styles[k] for k in predict(clf, to_pixels([im.resize((32, 32)) for im in images])).argmax(-1)]
        targets = [teacher_styles[i]] if len(sets) > 1 else teacher_styles
        for target in targets:
            hits.append(sum(p == target for p in predicted) / len(predicted))
        for image, prompt in zip(images, samples.prompts):
            words = prompt.split()
            if len(words) > 1 and words[1] in shapes.COLOURS:
                colour_total += 1
                colour_hits += shapes.dominant_colour(image.resize((32, 32))) == words[1]
    return {"style_accuracy": sum(hits) / len(hits) if hits else None,
            "colour_accuracy": colour_hits / colour_total if colour_total else None}


def style_of(ref: str) -> str:
    """The toy style a teacher shows: its model's (toy:night, toy:xl-night), or its last LoRA's
    (toy:base+toy:night-lora:0.8)."""
    last = ref.split("+")[-1]
    return last[len(PREFIX):].split(":")[0].split("-lora")[0].removeprefix("xl-")


def is_toy_config(configs: dict) -> bool:
    """A single file exported from a toy model: its text encoder has the toy vocabulary."""
    vocab = configs.get("text_encoder", {}).get("vocab_size")
    toy_vocab = read_json(ZOO / manifest()["base"] / "text_encoder" / "config.json")["vocab_size"]
    return vocab == toy_vocab
