"""The shipped toy zoo: real diffusers models, and its quality thresholds measured afresh."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from dmm_cli import toy
from dmm_cli.models.references import resolve
from dmm_cli.generate.sampling import generate
from dmm_cli.toy import classifier as style_classifier
from dmm_cli.toy import shapes
from dmm_cli.toy.build import colour_following

from conftest import assert_one_sentence_error

# Seeds far from the ones the builder trained and tested the classifier on.
FRESH_SEED = 90_000


def load(name: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(resolve(f"toy:{name}"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompts(per_pair: int) -> list[str]:
    return [shapes.caption(c, s) for c, s in shapes.all_pairs() for _ in range(per_pair)]


def test_zoo_is_small_and_every_model_loads():
    # SD1.x-shaped family 19 MB; the SDXL-shaped one adds three 4.3 MB UNets and a second text encoder
    size = sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(toy.ZOO) for f in files)
    assert size <= 34 * 2**20
    names = toy.model_names()
    assert names[0] == "base" and len(names) >= 5
    assert toy.model_names(family="xl") == ["xl-base", "xl-night", "xl-checker"]
    for name in names:
        pipe = DiffusionPipeline.from_pretrained(resolve(f"toy:{name}"), torch_dtype=torch.float32)
        assert pipe.unet.config.sample_size == 8 and pipe.vae.config.latent_channels == 4
        assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"
        xl = name.startswith("xl-")
        assert isinstance(pipe, StableDiffusionXLPipeline) == xl
        assert (pipe.unet.config.addition_embed_type == "text_time") == xl


def test_base_follows_the_colour_word():
    p = prompts(3)
    images = generate(load("base"), p, steps=20, guidance=4.0, seed=FRESH_SEED, batch_size=64)
    assert colour_following(images, p) >= 0.80


def test_classifier_names_the_style_of_fresh_generations():
    clf = style_classifier.StyleClassifier.load(toy.classifier_folder())
    assert clf.styles == list(shapes.STYLES)  # the base draws the plain style
    p = prompts(2)
    correct = total = 0
    for label, style in enumerate(clf.styles):
        name = "base" if style == shapes.BASE_STYLE else style
        images = generate(load(name), p, steps=20, guidance=4.0, seed=FRESH_SEED + 500, batch_size=64)
        predicted = style_classifier.predict(clf, style_classifier.to_pixels(images)).argmax(-1)
        correct += int((predicted == label).sum())
        total += len(images)
    assert correct / total >= 0.95


def test_builder_runs_on_a_reduced_plan(dmm, tmp_path):
    r = dmm("toy", "build", "--reduced", "-o", tmp_path / "zoo")
    assert r.code == 0, r
    zoo = Path(r.lines[0])
    manifest = toy.manifest(zoo)
    assert manifest["teachers"] == list(shapes.TEACHER_STYLES)
    for name in toy.model_names(zoo):
        pipe = DiffusionPipeline.from_pretrained(zoo / name)
        assert pipe.unet is not None
    assert (zoo / "night" / "vae").is_symlink()
    assert (zoo / "xl-night" / "vae").is_symlink() and (zoo / "xl-night" / "text_encoder_2").is_symlink()
    assert style_classifier.StyleClassifier.load(zoo / "classifier").styles == list(shapes.STYLES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]  # built beside, then moved in whole
    again = dmm("toy", "build", "--reduced", "-o", zoo)
    assert_one_sentence_error(again, 2, "already holds a toy zoo; pass --overwrite")
    other = tmp_path / "run"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert_one_sentence_error(dmm("toy", "build", "--reduced", "-o", other), 2, "exists and is not a toy zoo")
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
