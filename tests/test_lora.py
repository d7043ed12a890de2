"""LoRA teachers: the toy zoo's LoRAs (kohya file and diffusers/PEFT folder) against diffusers' own loader and fuse,
through generate, baseline-merge and distill, and every bad LoRA input as one sentence."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import TOY_TEACHERS, assert_one_sentence_error, tiny_recipe
from dmm_cli.toy import ZOO
from families import build

KOHYA = ZOO / "loras" / "night-lora.safetensors"
PEFT = ZOO / "loras" / "checker-lora-peft"


def with_text_encoder_lora(path: Path, rank: int = 4) -> Path:
    """A kohya file: the toy night LoRA's UNet layers plus a seeded text-encoder LoRA on every layer kind of the
    first encoder layer, so both parts a LoRA reaches are exercised."""
    tensors = load_file(KOHYA)
    config = json.loads((ZOO / "base" / "text_encoder" / "config.json").read_text())
    h, i = config["hidden_size"], config["intermediate_size"]
    g = torch.Generator().manual_seed(0)
    layers = {"self_attn_q_proj": (h, h), "self_attn_k_proj": (h, h), "self_attn_v_proj": (h, h),
              "self_attn_out_proj": (h, h), "mlp_fc1": (i, h), "mlp_fc2": (h, i)}
    for name, (rows, cols) in layers.items():
        key = f"lora_te_text_model_encoder_layers_0_{name}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, cols, generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(rows, rank, generator=g) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(rank / 2)
    save_file(tensors, path)
    return path


def diffusers_fused(folder: Path, loras: list[tuple[Path, float]]) -> Path:
    """toy:base with `loras` loaded, weighted, fused and saved by diffusers itself (PEFT backend), in fp32."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ZOO / "base", torch_dtype=torch.float32, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    names = []
    for k, (path, _) in enumerate(loras):
        names.append(f"lora{k}")
        if path.is_dir():
            pipe.load_lora_weights(str(path), adapter_name=names[-1])
        else:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=names[-1])
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), np.int16) for p in sorted(folder.glob("*.png"))])


def test_generating_with_loras_equals_generating_with_the_folder_diffusers_fused(dmm, tmp_path):
    mixed = with_text_encoder_lora(tmp_path / "night-and-text.safetensors")
    fused = diffusers_fused(tmp_path / "fused", [(mixed, 0.8), (PEFT, 0.5)])
    base_text = load_file(ZOO / "base" / "text_encoder" / "model.safetensors")
    fused_text = load_file(fused / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(base_text[k].float(), fused_text[k].float()) for k in base_text)  # the TE LoRA landed

    args = ("a red circle", "-n", "3", "--steps", "8", "--guidance", "4")
    r = dmm("generate", *args, "--model", "toy:base", "--lora", f"{mixed}:0.8", "--lora", "toy:checker-lora-peft:0.5",
            "-o", tmp_path / "with-loras")
    assert r.code == 0, r
    r = dmm("generate", *args, "--model", fused, "-o", tmp_path / "fused-folder")
    assert r.code == 0, r
    ours, theirs = pixels(tmp_path / "with-loras"), pixels(tmp_path / "fused-folder")
    assert ours.shape == theirs.shape == (3, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= 1  # fp32 sums in another order: at most one level of 255
    plain = dmm("generate", *args, "--model", "toy:base", "-o", tmp_path / "plain")
    assert plain.code == 0 and np.abs(pixels(tmp_path / "plain") - ours).mean() > 5  # the LoRAs change the pictures

    # The fused folder distill and eval load: the same weights, stored in the base's fp16.
    from dmm_cli.models.lora import resolve

    cached = resolve(f"toy:base+{mixed}:0.8+toy:checker-lora-peft:0.5")
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        mine, reference = load_file(cached / part / name), load_file(fused / part / name)
        assert mine.keys() == reference.keys()
        for key in mine:
            assert mine[key].dtype == torch.float16
            torch.testing.assert_close(mine[key].float(), reference[key], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("method", ["average", "task-arithmetic", "ties", "dare"])
def test_weight_merges_on_lora_teachers_match_merges_on_fused_teachers(dmm, tmp_path, method):
    teachers = [(KOHYA, 1.0), (PEFT, 0.7)]
    fused = [diffusers_fused(tmp_path / f"fused{k}", [t]) for k, t in enumerate(teachers)]
    common = ("--method", method, "--base", "toy:base", "--dtype", "fp32") if method != "average" else (
        "--method", method, "--dtype", "fp32")
    r = dmm("baseline-merge", *common, "toy:base+toy:night-lora", "toy:base+toy:checker-lora-peft:0.7",
            "-o", tmp_path / "from-loras")
    assert r.code == 0, r
    r = dmm("baseline-merge", *common, *fused, "-o", tmp_path / "from-fused")
    assert r.code == 0, r
    name = "unet/diffusion_pytorch_model.safetensors"
    mine, reference = load_file(tmp_path / "from-loras" / name), load_file(tmp_path / "from-fused" / name)
    assert mine.keys() == reference.keys()
    base = load_file(ZOO / "base" / name)
    moved = 0
    for key in mine:
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-4, atol=1e-5)
        moved += not torch.equal(mine[key], base[key].float())
    assert moved > 100  # the LoRA layers really were merged
    inputs = json.loads(_metadata(tmp_path / "from-loras" / name)["dmm.inputs"])
    assert [x["ref"] for x in inputs["teachers"][1]["loras"]] == ["toy:checker-lora-peft"]


def test_every_option_that_takes_a_model_takes_a_model_with_loras(dmm, tmp_path):
    """`MODEL+LORA:SCALE` as dmm fetch's REF, baseline-merge's --base, export's MODEL and a recipe teacher's model
    (the same teacher as its `loras` list); a recipe's base refuses it and says how to fuse it."""
    name = "unet/diffusion_pytorch_model.safetensors"
    r = dmm("fetch", "toy:base+toy:night-lora:0.7", "--json")
    assert r.code == 0, r
    (fetched,) = json.loads(r.out)
    assert fetched["source"] == "fused"
    reference = load_file(diffusers_fused(tmp_path / "reference", [(KOHYA, 0.7)]) / name)
    mine = load_file(Path(fetched["folder"]) / name)
    for key in reference:  # the fused folder keeps the toy UNet's fp16
        torch.testing.assert_close(mine[key].float(), reference[key], rtol=1e-3, atol=1e-3)

    merged = {}
    for how, base in (("inline", "toy:base+toy:night-lora:0.7"), ("folder", fetched["folder"])):
        r = dmm("baseline-merge", "--method", "task-arithmetic", "--base", base, "toy:outline", "toy:stripes",
                "-o", tmp_path / how)
        assert r.code == 0, r
        merged[how] = load_file(tmp_path / how / name)
    assert all(torch.equal(merged["inline"][k], merged["folder"][k]) for k in merged["folder"])

    for how, model in (("inline", "toy:base+toy:night-lora:0.7"), ("folder", fetched["folder"])):
        r = dmm("export", model, "--single-file", "-o", tmp_path / f"{how}.safetensors")
        assert r.code == 0, r
    one, other = (load_file(tmp_path / f"{how}.safetensors") for how in ("inline", "folder"))
    assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)

    students, local = {}, tmp_path / "loras" / "night.safetensors"
    local.parent.mkdir()
    local.write_bytes(KOHYA.read_bytes())
    for how, teacher in (("inline", {"model": f"toy:base+{local}:0.7"}),
                         ("listed", {"model": "toy:base", "loras": [{"model": str(local), "scale": 0.7}]})):
        recipe = tiny_recipe(tmp_path / how, teachers=[{"name": "night", **teacher}, TOY_TEACHERS[1]],
                             **{"train.max_steps": 2})
        r = dmm("distill", recipe)
        assert r.code == 0, r
        students[how] = load_file(tmp_path / how / "run" / name)
        shared = "".join((tmp_path / how / "run" / f).read_text() for f in ("run.json", "styles.json", "README.md"))
        assert str(tmp_path) not in shared  # files meant for sharing name a local LoRA by its name alone
    assert all(torch.equal(students["inline"][k], students["listed"][k]) for k in students["listed"])
    assert json.loads((tmp_path / "inline" / "run" / "styles.json").read_text())["styles"][0]["teacher"] == (
        "toy:base+night.safetensors:0.7")

    r = dmm("distill", tiny_recipe(tmp_path / "based", base="toy:base+toy:night-lora"))
    assert_one_sentence_error(r, 2, "base toy:base+toy:night-lora", "dmm fetch toy:base+toy:night-lora")


def _metadata(path: Path) -> dict:
    from dmm_cli.files.safetensors_header import read_metadata

    return read_metadata(path)


def sdxl_lora(path: Path) -> Path:
    """A kohya SDXL LoRA's shape: second text encoder and 2048-wide cross-attention."""
    save_file({
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4),
    }, path)
    return path


def foreign_layers(path: Path) -> Path:
    save_file({f"lora_unet_nowhere_{k}_to_q.lora_{w}.weight": torch.zeros(4, 4) for k in range(3)
               for w in ("down", "up")}, path)
    return path


def ranks_apart(path: Path) -> Path:
    """The toy LoRA with one layer's up a rank wider than its down."""
    tensors = load_file(KOHYA)
    up = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[up] = torch.zeros(tensors[up].shape[0], tensors[up].shape[1] + 1, *tensors[up].shape[2:])
    save_file(tensors, path)
    return path


def pickled(path: Path) -> Path:
    torch.save(load_file(KOHYA), path)
    return path


@pytest.mark.parametrize("make, lora_arg, fragments", [
    (sdxl_lora, "{path}", ("sdxl.safetensors", "SDXL", "SD1.x", "toy:base")),
    (foreign_layers, "{path}", ("foreign.safetensors", "0 of its 3 LoRA layers")),
    (ranks_apart, "{path}", ("ranks.safetensors", "pairs a down of rank 8 with an up of rank 9")),
    (None, "toy:night-lora:0.5x", ("scale '0.5x' is not a number",)),
    (None, "toy:night-lora:-0.5", ("finite number >= 0",)),
    (pickled, "{path}", ("lora.pt", "pickle", "--allow-pickle")),
    (None, "toy:nothing-lora", ("toy:nothing-lora", "no such toy model")),
])
def test_bad_loras_get_one_sentence(dmm, tmp_path, make, lora_arg, fragments):
    names = {sdxl_lora: "sdxl.safetensors", foreign_layers: "foreign.safetensors", ranks_apart: "ranks.safetensors",
             pickled: "lora.pt"}
    path = make(tmp_path / names[make]) if make else None
    r = dmm("generate", "a red circle", "--model", "toy:base", "--lora", lora_arg.format(path=path), "--steps", "2",
            "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_pickle_lora_loads_with_allow_pickle_and_is_kept_as_safetensors(dmm, tmp_path):
    path = pickled(tmp_path / "lora.pt")
    r = dmm("fetch", "--lora", "--allow-pickle", path)
    assert r.code == 0, r
    converted = Path(r.lines[0])
    assert converted.suffix == ".safetensors"
    assert load_file(converted).keys() == load_file(KOHYA).keys()
    r = dmm("generate", "a red circle", "--model", "toy:base", "--lora", f"{converted}:0.5", "--steps", "2",
            "-o", tmp_path / "out")
    assert r.code == 0 and len(r.lines) == 1, r


def test_a_recipe_scale_must_be_a_number_at_least_zero(dmm, tmp_path):
    recipe = yaml.safe_load(Path("recipes/toy_loras.yaml").read_text())
    recipe["teachers"][0]["loras"][0]["scale"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = dmm("distill", path, "--dry-run")
    assert_one_sentence_error(r, 2, "teachers[0].loras[0].scale", ">= 0")


def test_the_sd15_topology_takes_a_lora_of_its_own_layers(dmm, tmp_path):
    """A kohya LoRA on real SD1.5 block names (two layers per block, linear and conv) fuses into a real-topology
    model and changes exactly the weights it names."""
    base = build(tmp_path / "sd15", "sd15")
    name = "unet/diffusion_pytorch_model.safetensors"
    before = load_file(base / name)
    layers = ("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v", "up_blocks.3.resnets.2.conv1")
    names = {"lora_unet_" + layer.replace(".", "_"): before[f"{layer}.weight"].shape for layer in layers}
    tensors = {}
    g = torch.Generator().manual_seed(1)
    for key, shape in names.items():
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, *shape[1:], generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(shape[0], 2, *([1, 1] if len(shape) == 4 else []), generator=g)
    save_file(tensors, tmp_path / "real.safetensors")
    from dmm_cli.models.lora import resolve

    fused = resolve(f"{base}+{tmp_path / 'real.safetensors'}:0.5")
    after = load_file(fused / name)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{layer}.weight" for layer in layers}
    key = "lora_unet_" + layers[1].replace(".", "_")
    conv = before[f"{layers[1]}.weight"]
    expected = 0.5 * (tensors[f"{key}.lora_up.weight"].flatten(1) @ tensors[f"{key}.lora_down.weight"].flatten(1))
    torch.testing.assert_close(after[f"{layers[1]}.weight"] - conv, expected.reshape(conv.shape))


def test_a_peft_adapter_folder_reads_like_its_diffusers_file(tmp_path):
    """PEFT's own save_pretrained folder (base_model.model keys, α in adapter_config.json) gives the same fused
    weights as the diffusers file it was made from, α/r included."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    from dmm_cli.models.lora import resolve

    state = load_file(PEFT / "pytorch_lora_weights.safetensors")
    layers = sorted({k[len("unet."):].rsplit(".lora_", 1)[0] for k in state})
    rank = state[f"unet.{layers[0]}.lora_A.weight"].shape[0]
    unet = UNet2DConditionModel.from_pretrained(ZOO / "base" / "unet")
    model = get_peft_model(unet, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=layers))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                layer, which = name.removeprefix("base_model.model.").split(".lora_")
                param.copy_(state[f"unet.{layer}.lora_{which.replace('.default', '')}"])
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    name = "unet/diffusion_pytorch_model.safetensors"
    from_adapter = load_file(resolve(f"toy:base+{tmp_path / 'adapter'}:0.5") / name)  # α = 2r, halved back
    from_file = load_file(resolve("toy:base+toy:checker-lora-peft") / name)
    assert from_adapter.keys() == from_file.keys()
    for key in from_file:
        torch.testing.assert_close(from_adapter[key], from_file[key], rtol=0, atol=1e-3)


def test_hub_loras_are_fetched_pinned_verified_and_cached(tmp_path):
    from conftest import dmm_cli, one_sentence
    from hub_server import FakeHub

    repos = {name: tmp_path / "repos" / name for name in ("night", "checker", "two", "pickled")}
    for folder in repos.values():
        folder.mkdir(parents=True)
    (repos["night"] / "night_v1.safetensors").write_bytes(KOHYA.read_bytes())
    (repos["night"] / "README.md").write_text("a LoRA\n")
    (repos["checker"] / "pytorch_lora_weights.safetensors").write_bytes(
        (PEFT / "pytorch_lora_weights.safetensors").read_bytes())
    for k in range(2):
        (repos["two"] / f"v{k}.safetensors").write_bytes(KOHYA.read_bytes())
    torch.save(load_file(KOHYA), repos["pickled"] / "lora.bin")
    with FakeHub() as hub:
        for name, folder in repos.items():
            hub.add(f"someone/{name}-lora", folder)
        p = dmm_cli(tmp_path, hub.url, "fetch", "--lora", "someone/night-lora", "someone/checker-lora",
                    "someone/two-lora/v1.safetensors")
        assert p.returncode == 0, p.stderr
        night, checker, second = map(Path, p.stdout.split())
        assert night.read_bytes() == KOHYA.read_bytes() and night.name == "night_v1.safetensors"
        assert checker.name == "pytorch_lora_weights.safetensors" and checker.is_file()
        assert second.name == "v1.safetensors" and "snapshots" in second.parts  # in the Hub cache, pinned
        p = dmm_cli(tmp_path, hub.url, "generate", "a red circle", "--model", "toy:base", "--lora",
                    "someone/night-lora:0.8", "--lora", "someone/checker-lora", "--steps", "2", "-o",
                    str(tmp_path / "out"))
        assert p.returncode == 0 and len(p.stdout.split()) == 1, p.stderr
        one_sentence(dmm_cli(tmp_path, hub.url, "fetch", "--lora", "someone/two-lora"), 2,
                     "someone/two-lora: the repo holds 2 .safetensors files; name one")
        one_sentence(dmm_cli(tmp_path, hub.url, "fetch", "--lora", "someone/pickled-lora"), 2, "--allow-pickle")
        one_sentence(dmm_cli(tmp_path, hub.url, "fetch", "--lora", "someone/missing-lora"), 2,
                     "no such repo or file on the Hub")
    p = dmm_cli(tmp_path, None, "fetch", "--lora", "someone/night-lora", offline=True)  # the cache, verified
    assert p.returncode == 0 and Path(p.stdout.strip()) == night, p.stderr


@pytest.mark.slow  # 76 s: the default suite keeps the LoRA mechanics (fuse, fetch, merge, generate)
def test_a_lora_teacher_recipe_distils_to_90_percent_style_accuracy_on_held_out_prompts(dmm, tmp_path):
    recipe = yaml.safe_load(Path("recipes/toy_loras.yaml").read_text())
    recipe["teachers"] = [recipe["teachers"][0], recipe["teachers"][3]]  # night (kohya file), checker (PEFT folder)
    recipe["train"].update(max_steps=300, batch_size=16, checkpoint_every=1000)
    recipe["output"] = str(tmp_path / "run")
    path = tmp_path / "loras.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = dmm("distill", path, "--dry-run")  # checks every LoRA, fuses none
    assert r.code == 0 and "toy:base+toy:night-lora:1.0" in r.out, r
    fused = Path(os.environ["DMM_HOME"]) / "fused"
    assert not fused.exists()
    r = dmm("distill", path)
    assert r.code == 0, r
    assert len(list(fused.iterdir())) == 2  # each LoRA teacher fused once
    styles = json.loads((tmp_path / "run" / "styles.json").read_text())
    assert [s["teacher"] for s in styles["styles"]] == ["toy:base+toy:night-lora:1.0",
                                                         "toy:base+toy:checker-lora-peft:1.0"]
    # eval's default toy prompts are the colour/shape pairs no training picture shows
    r = dmm("eval", tmp_path / "run", "--recipe", path, "-k", "24", "--steps", "20", "--guidance", "4", "--json",
            "-o", tmp_path / "eval")
    assert r.code == 0, r
    reference, student = json.loads(r.out)["models"]
    assert reference["style_accuracy"] >= 0.9  # the LoRA teachers show their styles
    assert student["style_accuracy"] >= 0.9


def test_an_sdxl_kohya_lora_fuses_as_diffusers_fuses_it(tmp_path):
    """kohya names SDXL's UNet blocks the original way (input_blocks.4.1...) and its encoders te1/te2; the
    layers land where diffusers' own SDXL loader puts them, in the UNet and in both text encoders."""
    from diffusers import StableDiffusionXLPipeline

    from dmm_cli.models.lora import resolve
    from families import build_sdxl

    base = build_sdxl(tmp_path / "xl", dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    layers = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (64, 80),
              "lora_unet_output_blocks_1_1_transformer_blocks_1_attn1_to_q": (64, 64),
              **{f"lora_te1_text_model_encoder_layers_1_self_attn_{p}_proj": (32, 32) for p in ("q", "k", "v", "out")},
              **{f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj": (48, 48) for p in ("q", "k", "v", "out")}}
    tensors = {}
    for key, (rows, cols) in layers.items():
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, cols, generator=g) * 0.2
        tensors[f"{key}.lora_up.weight"] = torch.randn(rows, 4, generator=g) * 0.2
        tensors[f"{key}.alpha"] = torch.tensor(8.0)
    save_file(tensors, tmp_path / "xl-lora.safetensors")

    fused = resolve(f"{base}+{tmp_path / 'xl-lora.safetensors'}:0.7")
    pipe = StableDiffusionXLPipeline.from_pretrained(base, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(tmp_path), weight_name="xl-lora.safetensors", adapter_name="xl")
    pipe.set_adapters(["xl"], adapter_weights=[0.7])
    pipe.fuse_lora(adapter_names=["xl"])
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "reference")
    changed = 0
    for part in ("unet", "text_encoder", "text_encoder_2"):
        name = "diffusion_pytorch_model.safetensors" if part == "unet" else "model.safetensors"
        before, mine = load_file(base / part / name), load_file(fused / part / name)
        reference = load_file(tmp_path / "reference" / part / name)
        for key in before:
            torch.testing.assert_close(mine[key], reference[key], rtol=1e-5, atol=1e-6)
            changed += not torch.equal(mine[key], before[key])
    assert changed == len(layers)
