"""`dmm eval`: FID matrices, the cache, the report, and bad input."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import assert_one_sentence_error
from dmm_cli.files import state

FAST = ["--steps", "8", "--guidance", "4", "-k", "12", "--batch-size", "12"]


def write_recipe(folder: Path, teachers: list[str], **train) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"name": "pair", "base": "toy:base", "teachers": [{"name": t, "model": f"toy:{t}"} for t in teachers],
              "data": {"folder": "toy:shapes"},
              "train": {"max_steps": 60, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 1000, "log_every": 50,
                        **train},
              "output": str(folder / "student")}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A quickly distilled two-style student (night, checker): enough to tell the styles apart."""
    from dmm_cli.main import main

    folder = tmp_path_factory.mktemp("pair")
    recipe = write_recipe(folder, ["night", "checker"])
    assert main(["-q", "distill", str(recipe)]) == 0
    return folder / "student", recipe


def permuted_copy(student: Path, folder: Path) -> Path:
    """The same student with its style inputs swapped: style 0 now draws what style 1 drew."""
    import shutil

    shutil.copytree(student, folder, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    weights_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    weights["class_embedding.linear_1.weight"] = weights["class_embedding.linear_1.weight"][:, [1, 0]].contiguous()
    save_file(weights, weights_file)
    return folder


def test_fid_of_a_set_with_itself_is_zero_on_the_diagonal():
    from dmm_cli.eval.fid import fid_matrix
    from dmm_cli.eval.features import features_of
    from dmm_cli.toy.plugin import toy_space
    from dmm_cli.models.references import resolve
    from dmm_cli.models.pipeline import load_pipeline
    from dmm_cli.generate.samples import SamplerSettings, sample_set

    space = toy_space()
    prompts = ["a red circle", "a blue square", "a green triangle"] * 6
    sets = []
    for name in ("night", "checker", "outline"):
        folder = resolve(f"toy:{name}")
        sets.append(sample_set(lambda f=folder: load_pipeline(f, torch.device("cpu"), torch.float32), folder, None,
                               prompts, SamplerSettings(8, 4.0, 0), 18, name))
    feats = [features_of(s, space) for s in sets]
    m = fid_matrix(feats, feats)
    for i in range(3):
        assert abs(m[i][i]) < 1e-3
        assert all(m[i][j] > 1.0 for j in range(3) if j != i)


def test_permuted_student_shows_the_permutation_and_the_cache_holds(dmm, student, tmp_path):
    folder, recipe = student
    swapped = permuted_copy(folder, tmp_path / "swapped")
    r = dmm("eval", folder, swapped, "--recipe", recipe, "-o", tmp_path / "report", "--json", *FAST)
    assert r.code == 0, r
    metrics = json.loads(r.out)
    rows = {m["name"]: m for m in metrics["models"]}
    m, p = rows[str(folder)]["M"], rows[str(swapped)]["M"]
    assert m[0][0] < m[0][1] and m[1][1] < m[1][0], m  # the student learned which style is which
    assert p[0] == m[1] and p[1] == m[0]  # swapping the style inputs swaps the rows, exactly
    assert rows[str(swapped)]["fid_t"] > rows[str(folder)]["fid_t"]
    assert rows["reference"]["kind"] == "reference" and len(rows["reference"]["diag"]) == 2
    report = tmp_path / "report"
    assert {"metrics.json", "report.md"} <= {p.name for p in report.iterdir()}
    assert len(list(report.glob("heatmap-*.png"))) == 3 and len(list(report.glob("samples-*.png"))) == 3
    text = (report / "report.md").read_text()
    assert "| reference | reference |" in text and "FID_t" in text

    samples = state.home() / "samples"
    before = {p: p.stat().st_mtime_ns for p in samples.rglob("*.png")}
    again = dmm("eval", folder, swapped, "--recipe", recipe, "-o", tmp_path / "report2", *FAST)
    assert again.code == 0, again
    after = {p: p.stat().st_mtime_ns for p in samples.rglob("*.png")}
    assert before == after  # nothing was regenerated
    assert again.lines == [str(tmp_path / "report2" / "report.md")]
    assert json.loads((tmp_path / "report2" / "metrics.json").read_text())["models"] == metrics["models"]


def renamed(folder: Path, names: list[str]) -> Path:
    table = json.loads((folder / "styles.json").read_text())
    for style, name in zip(table["styles"], names):
        style["name"] = name
    (folder / "styles.json").write_text(json.dumps(table))
    return folder


def test_styles_are_paired_with_teachers_by_name(dmm, student, tmp_path):
    """Swapped style inputs named accordingly give the student's own M back; other names need --style-map."""
    folder, recipe = student
    r = dmm("eval", folder, "--recipe", recipe, "--json", "-o", tmp_path / "plain", *FAST)
    assert r.code == 0, r
    original = json.loads(r.out)["models"][1]["M"]
    swapped = renamed(permuted_copy(folder, tmp_path / "swapped"), ["checker", "night"])
    r = dmm("eval", swapped, "--recipe", recipe, "--json", "-o", tmp_path / "by-name", *FAST)
    assert r.code == 0, r
    assert json.loads(r.out)["models"][1]["M"] == original
    converted = renamed(permuted_copy(folder, tmp_path / "converted"), ["style-0", "style-1"])
    r = dmm("eval", converted, "--recipe", recipe, "-o", tmp_path / "mismatch", *FAST)
    assert_one_sentence_error(r, 2, "style-0, style-1", "night, checker", "--style-map")
    r = dmm("eval", converted, "--recipe", recipe, "--style-map", "style-0=checker,style-1=night", "--json",
            "-o", tmp_path / "mapped", *FAST)
    assert r.code == 0, r
    assert json.loads(r.out)["models"][1]["M"] == original
    r = dmm("eval", converted, "--recipe", recipe, "--style-map", "style-9=night", "-o", tmp_path / "bad", *FAST)
    assert_one_sentence_error(r, 2, "--style-map", "no style 'style-9'")
    r = dmm("eval", converted, "--recipe", recipe, "--style-map", "style-0=night,style-1=night", "-o", tmp_path / "bad",
            *FAST)
    assert_one_sentence_error(r, 2, "styles 'style-0' and 'style-1' both pair with the teacher 'night'")
    r = dmm("eval", converted, "--recipe", recipe, "--style-map", "style-0=checker,style-0=night,style-1=night",
            "-o", tmp_path / "bad", *FAST)
    assert_one_sentence_error(r, 2, "--style-map", "style 'style-0' is paired twice")


def test_weight_merge_gets_one_row_against_every_teacher(dmm, student, tmp_path):
    _, recipe = student
    merged = dmm("baseline-merge", "--recipe", recipe, "-o", tmp_path / "a-b")
    assert merged.code == 0, merged
    shutil.copytree(tmp_path / "a-b", tmp_path / "a" / "b")  # another model whose name makes the same file stem
    r = dmm("eval", tmp_path / "a-b", tmp_path / "a" / "b", "--recipe", recipe, "-o", tmp_path / "report", "--json",
            *FAST)
    assert r.code == 0, r
    entry = json.loads(r.out)["models"][1]
    assert entry["kind"] == "model" and len(entry["M"]) == 1 and entry["diag"] == entry["M"][0]
    assert entry["fid_t"] == pytest.approx(sum(entry["M"][0]))
    assert 0 <= entry["style_accuracy"] <= 1 and 0 <= entry["colour_accuracy"] <= 1
    shown = re.findall(r"!\[M\]\((.+)\)", (tmp_path / "report" / "report.md").read_text())
    assert len(set(shown)) == 3 and all((tmp_path / "report" / name).is_file() for name in shown)
    r = dmm("eval", tmp_path / "a-b", f"{tmp_path}/a/../a-b", "--recipe", recipe, "-o", tmp_path / "again", *FAST)
    assert_one_sentence_error(r, 2, f"{tmp_path}/a/../a-b: the same model as {tmp_path / 'a-b'}, given twice")


def test_bad_input(dmm, student, tmp_path):
    folder, _ = student
    four = write_recipe(tmp_path / "four", ["night", "outline", "stripes", "checker"])
    out = tmp_path / "out"
    assert_one_sentence_error(dmm("eval", folder, "--recipe", four, "-o", out), 2, "its styles (night, checker) are not",
                              "(night, outline, stripes, checker)")
    assert_one_sentence_error(dmm("eval", "toy:night", "--recipe", four, "--prompts", tmp_path / "none.txt",
                                  "-o", out), 2, "none.txt: no such file")
    assert_one_sentence_error(dmm("eval", "toy:night", "--recipe", four, "-k", "1", "-o", out), 2,
                              "--num-images must be at least 2")
    try:  # this machine's torch has no matching torchvision, so torch-fidelity cannot load here
        import torch_fidelity  # noqa: F401
        missing = "pt_inception-2015-12-05-6726825d.pth are not here and HF_HUB_OFFLINE is set"
    except (ImportError, RuntimeError):
        missing = "--features inception needs torch-fidelity"
    assert_one_sentence_error(dmm("eval", "toy:night", "--recipe", four, "--features", "inception", "-o", out), 1,
                              missing)
    assert not out.exists()


def test_prompts_past_the_text_encoder_are_noted_once(dmm, tmp_path):
    recipe = write_recipe(tmp_path / "pair", ["night", "outline"])
    prompts = tmp_path / "prompts.txt"  # the toy text encoder reads 8 tokens
    prompts.write_text("a red circle\na big blue square with a thin red outline on a white ground\n")
    r = dmm("eval", "toy:night", "--recipe", recipe, "--prompts", prompts, "-k", "4", "--steps", "2",
            "--negative", "blurry dark noisy grainy washed out pale flat dull", "-o", tmp_path / "report")
    assert r.code == 0, r
    assert r.err.count("prompts runs past") == 1 and "1 of the 2 prompts runs past the text encoder's 8 tokens" in r.err
    assert "'a big blue square" in r.err and "the --negative prompt runs past" in r.err


@pytest.fixture
def file_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a folder, counting the requests for each file."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()
    hits: dict[str, int] = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_inception_weights_are_downloaded_once_verified_and_cached(file_server, monkeypatch, capsys):
    import hashlib

    from dmm_cli.errors import NetworkError
    from dmm_cli.eval import features

    folder, url, hits = file_server
    weights = b"stand-in for the Inception weights" * 4096
    (folder / features.INCEPTION_FILE).write_bytes(weights)
    monkeypatch.setattr(features, "INCEPTION_URL", f"{url}/{features.INCEPTION_FILE}")
    monkeypatch.setattr(features, "INCEPTION_SHA256", hashlib.sha256(weights).hexdigest())
    monkeypatch.delenv("HF_HUB_OFFLINE")
    cached = state.home() / "weights" / features.INCEPTION_FILE

    assert features.inception_weights(None) == cached and cached.read_bytes() == weights
    assert features.inception_weights(None) == cached and sum(hits.values()) == 1  # cached, checked, not refetched
    cached.write_bytes(b"corrupt")
    assert features.inception_weights(None) == cached and cached.read_bytes() == weights
    assert sum(hits.values()) == 2 and "not the FID Inception weights" in capsys.readouterr().err

    cached.unlink()
    monkeypatch.setattr(features, "INCEPTION_SHA256", "0" * 64)  # the server hands out something else
    with pytest.raises(NetworkError, match="nothing was kept"):
        features.inception_weights(None)
    assert list(cached.parent.iterdir()) == []  # no file, no temporary litter

    monkeypatch.setattr(features, "INCEPTION_URL", f"{url}/missing.pth")
    with pytest.raises(NetworkError, match=f"download it by hand to {cached}"):
        features.inception_weights(None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetworkError, match="HF_HUB_OFFLINE is set; download http"):
        features.inception_weights(None)
    assert sum(hits.values()) == 4


def test_kid_settings_and_the_small_k_warning_are_recorded(dmm, student, tmp_path):
    folder, recipe = student
    r = dmm("eval", folder, "--recipe", recipe, "--negative", "blurry", "-o", tmp_path / "report", "--json", *FAST)
    assert r.code == 0, r
    metrics = json.loads(r.out)
    s = metrics["settings"]
    assert s["negative"] == "blurry" and s["k_below_feature_dims"] and s["feature_dims"] == 64
    assert s["distinct_prompts"] == 4 and len(s["prompts_sha256"]) == 64 and s["protocol"] is None
    assert "below the 64 feature dimensions" in r.err
    for m in metrics["models"]:
        assert len(m["kid_diag"]) == 2 and m["kid_t"] == sum(m["kid_diag"])
    rows = {m["kind"]: m for m in metrics["models"]}
    assert rows["reference"]["kid_t"] < rows["student"]["kid_t"]  # a teacher is closest to itself, in KID too
    report = (tmp_path / "report" / "report.md").read_text()
    assert "**Warning:** K = 12" in report and "KID_t" in report and "'blurry'" in report


def test_protocols(dmm, tmp_path):
    from dmm_cli.eval.run import settings_for

    paper = settings_for("paper", {"steps": 10})
    assert paper["steps"] == 10 and paper["scheduler"] == "dpm++-karras" and paper["num_images"] == 5000
    assert settings_for(None, {})["num_images"] == 50
    r = dmm("eval", "toy:night", "--recipe", "recipes/toy_styles.yaml", "--protocol", "iclr", "-o", tmp_path / "x")
    assert_one_sentence_error(r, 2, "--protocol: unknown protocol 'iclr'")


def tiny_clip(folder: Path) -> Path:
    """A CLIP model of the real architecture at tiny widths, with the toy zoo's CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from dmm_cli.models.references import resolve

    tokenizer = CLIPTokenizer.from_pretrained(resolve("toy:base") / "tokenizer")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def clip_setup(student, tmp_path):
    folder, recipe = student
    clip = tiny_clip(tmp_path / "clip")
    not_clip = tmp_path / "not-clip"
    shutil.copytree(clip, not_clip)
    config = json.loads((not_clip / "config.json").read_text())
    (not_clip / "config.json").write_text(json.dumps(dict(config, model_type="siglip")))
    args = ["eval", str(folder), "--recipe", str(recipe), "-k", "4", "--steps", "2", "--features", "pixels", "--json"]
    return clip, not_clip, args


def test_clip_score_from_the_hub_by_default_then_from_the_cache_offline(student, tmp_path):
    from conftest import dmm_cli
    from dmm_cli.eval.clip import DEFAULT_CLIP
    from hub_server import FakeHub

    clip, _, args = clip_setup(student, tmp_path)
    with FakeHub() as hub:
        hub.add(DEFAULT_CLIP, clip)
        p = dmm_cli(tmp_path, hub.url, *args, "-o", str(tmp_path / "default"))  # online: the default CLIP
        assert p.returncode == 0, p.stderr
        metrics = json.loads(p.stdout)
        assert metrics["settings"]["clip"] == DEFAULT_CLIP
        scores = [m["clip_score"] for m in metrics["models"]]
        assert all(isinstance(s, float) and -100 <= s <= 100 for s in scores) and len(set(scores)) > 1
    # offline: the cached copy serves, verified
    p = dmm_cli(tmp_path, None, *args, "--clip", DEFAULT_CLIP, "-o", str(tmp_path / "offline"), offline=True)
    assert p.returncode == 0, p.stderr
    assert [m["clip_score"] for m in json.loads(p.stdout)["models"]] == scores  # same pictures, same weights


@pytest.mark.slow  # 30 s of eval start-ups; the default suite keeps the scores, online and from the cache
def test_clip_references_that_are_not_clip_or_not_there(student, tmp_path):
    from conftest import dmm_cli, one_sentence
    from hub_server import FakeHub

    _, not_clip, args = clip_setup(student, tmp_path)
    with FakeHub() as hub:
        hub.add("someone/not-clip", not_clip)
        one_sentence(dmm_cli(tmp_path, hub.url, *args, "--clip", "someone/not-clip"), 2,
                     "--clip someone/not-clip: not a CLIP model (its config.json says model_type 'siglip')")
        one_sentence(dmm_cli(tmp_path, hub.url, *args, "--clip", "someone/missing"), 2,
                     "someone/missing: no such repo or file on the Hub")
    # offline and uncached, the default is skipped with a note
    p = dmm_cli(tmp_path / "fresh", None, *args, "-o", str(tmp_path / "fresh-out"), offline=True)
    assert p.returncode == 0 and "CLIP score skipped" in p.stderr, p.stderr
    assert json.loads(p.stdout)["settings"]["clip"] is None
    one_sentence(dmm_cli(tmp_path, None, *args, "--clip", str(not_clip), offline=True), 2, "not a CLIP model")
