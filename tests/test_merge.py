"""Weight-space baselines: each method against a plain reference written from its formula, and the CLI."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_one_sentence_error
from dmm_cli.models.references import resolve
from dmm_cli.merge import METHODS, MergeParams

UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tensors():
    base = rand(6, 5, seed=0)
    return base, [base + 0.1 * rand(6, 5, seed=i) for i in (1, 2, 3)]


def reference_ties(base, models, w, density, lam):
    """TIES as the formulas say, one entry at a time."""
    deltas = []
    for m in models:
        d = (m - base).flatten().tolist()
        k = max(1, int(torch.tensor(density * len(d)).ceil()))
        keep = sorted(range(len(d)), key=lambda j: -abs(d[j]))[:k]
        deltas.append([d[j] if j in keep else 0.0 for j in range(len(d))])
    out = []
    for j in range(len(deltas[0])):
        total = sum(wi * dl[j] for wi, dl in zip(w, deltas))
        sign = (total > 0) - (total < 0)
        agree = [i for i, dl in enumerate(deltas) if dl[j] != 0 and ((dl[j] > 0) - (dl[j] < 0)) == sign]
        num = sum(w[i] * deltas[i][j] for i in agree)
        den = sum(w[i] for i in agree) or 1.0
        out.append(num / den)
    return base + lam * torch.tensor(out).view(base.shape)


def test_average(tensors):
    base, models = tensors
    w = (1.0, 2.0, 3.0)
    got = METHODS["average"].fn(None, models, MergeParams(w), "k")
    expected = (models[0] * 1 + models[1] * 2 + models[2] * 3) / 6
    assert torch.allclose(got, expected, atol=1e-6)


def test_task_arithmetic(tensors):
    base, models = tensors
    w = (0.5, 1.0, -0.25)
    got = METHODS["task-arithmetic"].fn(base, models, MergeParams(w, lam=0.7), "k")
    expected = base + 0.7 * sum(wi * (m - base) for wi, m in zip(w, models))
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.fixture(params=["whole", "sliced"])
def slicing(request, monkeypatch):
    """Methods merge large tensors slice by slice: with 7-entry slices, these small ones take that path too."""
    from dmm_cli.merge import registry

    if request.param == "sliced":
        monkeypatch.setattr(registry, "WHOLE", 7)
        monkeypatch.setattr(registry, "SLICE", 7)
    return request.param


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("w", [(1.0, 0.5, 2.0), (1.0, -0.5, 0.0)])
def test_ties(tensors, density, w, slicing):
    base, models = tensors
    got = METHODS["ties"].fn(base, models, MergeParams(w, density=density, lam=0.9), "k")
    assert torch.allclose(got, reference_ties(base, models, w, density, 0.9), atol=1e-6)


def sorted_ties(base, models, w, density, lam):
    """TIES by a full sort and masks, for tensors too large for reference_ties."""
    deltas = torch.stack([m.float() - base for m in models])
    k = math.ceil(density * base.numel())
    kth = deltas.abs().sort(dim=1, descending=True).values[:, k - 1:k]
    kept = torch.where(deltas.abs() >= kth, deltas, 0.0)  # ties at the threshold kept
    weights = torch.tensor(w)[:, None]
    sign = (weights * kept).sum(0).sign()
    agree = (kept != 0) & (kept.sign() == sign)
    den = (weights * agree).sum(0)
    return base + lam * (weights * kept * agree).sum(0) / torch.where(den == 0, 1.0, den)


def large_teachers(values: str):
    """fp16 teachers around an fp32 base, large enough for the sampled brackets and compiled passes."""
    from dmm_cli.merge.fused import COMPILE_FROM

    g = torch.Generator().manual_seed(5)
    n = COMPILE_FROM * 2 + 17
    base = torch.randn(n, generator=g).half().float()

    def change():
        return {"gaussian": torch.randn(n, generator=g),
                "few distinct": torch.randint(-3, 4, (n,), generator=g).float() * 0.25,
                "mostly zero": torch.where(torch.rand(n, generator=g) < 0.9, 0.0, torch.randn(n, generator=g)),
                "tiny and huge": torch.randn(n, generator=g) * 2.0 ** torch.randint(-20, 4, (n,), generator=g),
                "one is the base": torch.randn(n, generator=g)}[values]
    teachers = [(base + change()).half() for _ in range(3)]
    if values == "one is the base":  # as where a LoRA teacher leaves a tensor alone
        teachers[1] = base.half()
    return base, teachers


@pytest.mark.parametrize("values", ["gaussian", "few distinct", "mostly zero", "tiny and huge", "one is the base"])
def test_ties_on_large_tensors_is_exact(values, monkeypatch):
    """The sampled brackets and the compiled merge against a full sort, whole and in slices."""
    from dmm_cli.merge import fused, registry
    from dmm_cli.merge.fused import COMPILE_FROM

    base, models = large_teachers(values)
    for density, w in ((0.001, (1.0, 1.0, 1.0)), (0.2, (1.0, 0.5, 2.0)), (0.97, (1.0, -0.5, 0.0)), (1.0, (1.0, 2.0, 1.0))):
        got = METHODS["ties"].fn(base, models, MergeParams(w, density=density, lam=0.9), "k")
        assert torch.allclose(got, sorted_ties(base, models, w, density, 0.9), atol=1e-6), density
    signed = METHODS["dare"].fn(base, models, MergeParams((1.0, 0.5, 2.0), density=1.0, dare_sign=True), "k")
    assert torch.allclose(signed, sorted_ties(base, models, (1.0, 0.5, 2.0), 1.0, 1.0), atol=1e-6)
    monkeypatch.setattr(registry, "WHOLE", COMPILE_FROM)  # eager, three slices (compiled, it takes the whole)
    monkeypatch.setattr(registry, "SLICE", COMPILE_FROM)
    monkeypatch.setattr(fused, "_failed", True)
    got = METHODS["ties"].fn(base, models, MergeParams((1.0, 0.5, 2.0), density=0.3, lam=1.0), "k")
    assert torch.allclose(got, sorted_ties(base, models, (1.0, 0.5, 2.0), 0.3, 1.0), atol=1e-6)


def test_ties_when_every_bracket_misses_or_compiling_fails(monkeypatch, capsys):
    from dmm_cli.merge import fused, ties

    base, models = large_teachers("gaussian")
    expected = sorted_ties(base, models, (1.0, 1.0, 1.0), 0.2, 1.0)
    monkeypatch.setattr(ties, "SIGMAS", -10.0)  # brackets upside down: empty, so every threshold is searched again
    assert torch.allclose(METHODS["ties"].fn(base, models, MergeParams((1.0,) * 3, density=0.2), "k"), expected,
                          atol=1e-6)

    def no_compiler(fn):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\n(details)")
    monkeypatch.undo()
    monkeypatch.setattr(fused, "_compiled", no_compiler)
    monkeypatch.setattr(fused, "_failed", False)
    assert torch.allclose(METHODS["ties"].fn(base, models, MergeParams((1.0,) * 3, density=0.2), "k"), expected,
                          atol=1e-6)
    assert capsys.readouterr().err == ("warning: torch.compile does not work here (InductorError: CppCompileError: "
                                       "C++ compile error); merging without it, which is slower\n")


def test_dare_masks_drawn_slice_by_slice_are_the_whole_tensors_masks():
    from dmm_cli.merge.dare import dare_mask, mask_draws

    whole = dare_mask((1000, 7), 0.3, 5, "k", 2, "cpu").reshape(-1)
    draws = mask_draws(5, "k", 2)
    parts = torch.cat([torch.rand(n, generator=draws) < 0.3 for n in (4096, 2000, 904)])
    assert torch.equal(whole, parts)


def test_dare_masks_rescale_and_repeat(tensors, slicing):
    base, models = tensors
    params = MergeParams((1.0, 1.0, 1.0), density=0.3, lam=0.5, seed=7)
    got = METHODS["dare"].fn(base, models, params, "layer.weight")
    again = METHODS["dare"].fn(base, models, params, "layer.weight")
    assert torch.equal(got, again)
    other = METHODS["dare"].fn(base, models, MergeParams((1.0, 1.0, 1.0), density=0.3, lam=0.5, seed=8),
                               "layer.weight")
    assert not torch.equal(got, other)
    # rebuild from the masks: every kept entry is delta / density, every dropped one 0
    from dmm_cli.merge import dare_mask

    expected = base.clone()
    for i, m in enumerate(models):
        mask = dare_mask(m.shape, 0.3, 7, "layer.weight", i, "cpu")
        assert 0 < mask.float().mean() < 1
        expected += 0.5 * torch.where(mask, (m - base) / 0.3, torch.zeros_like(m))
    assert torch.allclose(got, expected, atol=1e-6)
    signed = METHODS["dare"].fn(base, models, MergeParams((1.0, 1.0, 1.0), density=1.0, lam=1.0, dare_sign=True),
                                "k")
    assert torch.allclose(signed, reference_ties(base, models, (1.0, 1.0, 1.0), 1.0, 1.0), atol=1e-6)


def test_average_of_identical_teachers_is_that_teacher(dmm, tmp_path):
    r = dmm("baseline-merge", "toy:night", "toy:night", "toy:night", "-o", tmp_path / "avg")
    assert r.code == 0, r
    merged, night = load_file(tmp_path / "avg" / UNET_FILE), load_file(resolve("toy:night") / UNET_FILE)
    assert merged.keys() == night.keys() and all(torch.equal(merged[k], night[k]) for k in night)


@pytest.mark.parametrize("method, base", [("average", []), ("average", ["--base", "toy:base"]),
                                          ("ties", ["--base", "toy:base"])])
def test_each_input_tensor_is_read_once_and_the_base_only_where_used(dmm, tmp_path, monkeypatch, method, base):
    from collections import Counter

    from dmm_cli.files.safetensors_io import TensorReader

    models = {resolve(f"toy:{name}").resolve(): name for name in ("base", "night", "stripes")}
    reads, original = Counter(), TensorReader.get

    def counted(self, name):
        tensor = original(self, name)
        reads[models[self.path.resolve().parent.parent], name, tensor.is_floating_point()] += 1
        return tensor
    monkeypatch.setattr(TensorReader, "get", counted)
    r = dmm("baseline-merge", "--method", method, *base, "toy:night", "toy:stripes", "-o", tmp_path / "out")
    assert r.code == 0, r
    assert set(reads.values()) == {1}
    read_from = {model for model, _, is_float in reads if is_float}
    assert read_from == ({"base", "night", "stripes"} if method == "ties" else {"night", "stripes"})


@pytest.mark.parametrize("base", [[], ["--base", "base"]])
def test_non_float_tensors_are_copied_from_the_base_or_else_the_first_teacher(dmm, tmp_path, base):
    from safetensors.torch import save_file

    for i, name in enumerate(("base", "night", "stripes")):
        shutil.copytree(resolve(f"toy:{name}"), tmp_path / name)
        weights = load_file(tmp_path / name / UNET_FILE)
        weights["counter"] = torch.arange(5, dtype=torch.int64) + 10 * i
        save_file(weights, tmp_path / name / UNET_FILE)
    r = dmm("baseline-merge", *[str(tmp_path / a) if a == "base" else a for a in base], str(tmp_path / "night"),
            str(tmp_path / "stripes"), "-o", tmp_path / "out")
    assert r.code == 0, r
    expected = torch.arange(5) + (0 if base else 10)
    assert torch.equal(load_file(tmp_path / "out" / UNET_FILE)["counter"], expected)


def test_ties_density_one_of_identical_teachers_is_that_teacher(dmm, tmp_path):
    r = dmm("baseline-merge", "--method", "ties", "--base", "toy:base", "--density", "1", "toy:stripes",
            "toy:stripes", "-o", tmp_path / "ties")
    assert r.code == 0, r
    merged, stripes = load_file(tmp_path / "ties" / UNET_FILE), load_file(resolve("toy:stripes") / UNET_FILE)
    assert all(torch.equal(merged[k], stripes[k]) for k in stripes)


def test_merged_folder_is_a_pipeline_with_metadata(dmm, tmp_path):
    from diffusers import StableDiffusionPipeline

    r = dmm("baseline-merge", "--method", "dare", "--recipe", "recipes/toy_styles.yaml", "--seed", "3",
            "--dtype", "fp32", "-o", tmp_path / "dare")
    assert r.code == 0, r
    assert r.lines == [str(tmp_path / "dare")]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "dare")
    assert pipe.unet.dtype == torch.float32
    with safe_open(str(tmp_path / "dare" / UNET_FILE), "pt") as f:
        meta = f.metadata()
    assert meta["dmm.method"] == "dare" and meta["dmm.seed"] == "3"
    inputs = json.loads(meta["dmm.inputs"])
    assert inputs["base"]["ref"] == "toy:base"
    assert [t["ref"] for t in inputs["teachers"]] == ["toy:night", "toy:outline", "toy:stripes", "toy:checker"]
    assert all(len(t["sha256"]) == 64 for t in inputs["teachers"])
    assert json.loads(meta["dmm.params"])["lambda"] == 0.25
    assert "dare" in (tmp_path / "dare" / "README.md").read_text()
    g = dmm("generate", "a red circle", "-m", tmp_path / "dare", "--steps", "3", "-o", tmp_path / "pic.png")
    assert g.code == 0, g


def odd_teacher(tmp_path, what: str) -> Path:
    folder = tmp_path / f"odd-{what}"
    shutil.copytree(resolve("toy:outline"), folder, symlinks=False)
    if what == "shape":  # a UNet of 2 input channels, its config saying so
        weights = load_file(folder / UNET_FILE)
        weights["conv_in.weight"] = weights["conv_in.weight"][:, :2].contiguous()
        from safetensors.torch import save_file
        save_file(weights, folder / UNET_FILE)
        config = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 2}))
    else:
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = "StableDiffusionXLPipeline"
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("args, fragment", [
    (["--method", "average", "toy:night"], "needs at least 2 teachers (got 1)"),
    (["--method", "ties", "toy:night"], "needs at least 2 teachers"),
    (["--method", "dare", "toy:night", "toy:outline"], "needs --base"),
    (["--method", "task-arithmetic", "toy:night"], "needs --base"),
    (["--method", "ties", "--base", "toy:base", "--density", "0", "toy:night", "toy:outline"],
     "--density must be in (0, 1] (got 0.0)"),
    (["--method", "dare", "--base", "toy:base", "--density", "1.5", "toy:night", "toy:outline"], "(got 1.5)"),
    (["--weights", "1,2,3", "toy:night", "toy:outline"], "3 weights for 2 teachers"),
    (["--weights", "1,x", "toy:night", "toy:outline"], "expected comma-separated numbers"),
    (["--method", "slerp", "toy:night", "toy:outline"], "unknown method 'slerp'"),
])
def test_bad_requests(dmm, tmp_path, args, fragment):
    r = dmm("baseline-merge", *args, "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, fragment)
    assert not (tmp_path / "out").exists()


def test_mismatched_teachers_are_named(dmm, tmp_path):
    shape = odd_teacher(tmp_path, "shape")
    r = dmm("baseline-merge", "toy:night", str(shape), "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, f"teacher {shape}", "conv_in.weight")
    arch = odd_teacher(tmp_path, "arch")
    r = dmm("baseline-merge", "toy:night", str(arch), "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, "different architectures")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite_and_only_a_merge_is_replaced(dmm, tmp_path):
    out = tmp_path / "out"
    assert dmm("baseline-merge", "toy:night", "toy:outline", "-o", out).code == 0
    r = dmm("baseline-merge", "toy:night", "toy:stripes", "-o", out)
    assert_one_sentence_error(r, 2, "already exists", "--overwrite")
    r = dmm("baseline-merge", "toy:night", "toy:stripes", "-o", out, "--overwrite")
    assert r.code == 0, r
    assert "toy:stripes" in (out / "README.md").read_text()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    r = dmm("baseline-merge", "toy:night", "toy:outline", "-o", mine, "--overwrite")
    assert_one_sentence_error(r, 2, "not written by dmm baseline-merge")
    assert (mine / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]
