"""`dmm fetch` against a real HTTP server on 127.0.0.1 speaking the Hub's routes (huggingface_hub does the rest)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import dmm_cli, one_sentence
from dmm_cli.models.references import resolve
from hub_server import COMMIT, FakeHub

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def hub(tmp_path):
    repo = tmp_path / "repo-base"
    shutil.copytree(resolve("toy:night"), repo, symlinks=False)
    torch.save({"w": torch.zeros(2)}, repo / "unet" / "diffusion_pytorch_model.bin")  # never to be fetched
    with FakeHub() as server:
        server.add("toy-org/night", repo)
        yield server


def test_first_fetch_then_cache_only(hub, tmp_path):
    p = dmm_cli(tmp_path, hub.url, "fetch", "toy-org/night", "--json")
    assert p.returncode == 0, p.stderr
    (entry,) = json.loads(p.stdout)
    folder = Path(entry["folder"])
    assert entry["commit"] == COMMIT and folder.name == COMMIT
    assert (folder / UNET).is_file() and not (folder / "unet" / "diffusion_pytorch_model.bin").exists()
    night = load_file(resolve("toy:night") / UNET)
    assert all(torch.equal(night[k], v) for k, v in load_file(folder / UNET).items())
    first = len(hub.downloads())
    assert first > 0 and not hub.downloads(".bin")

    again = dmm_cli(tmp_path, hub.url, "fetch", "toy-org/night")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(folder)
    assert len(hub.downloads()) == first  # nothing downloaded twice

    offline = dmm_cli(tmp_path, None, "fetch", "toy-org/night", offline=True)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.strip() == str(folder)


def test_interrupted_download_resumes(hub, tmp_path):
    # huggingface_hub streams in 10 MB chunks, so only a larger file can be resumed part-way
    weights = load_file(hub.repos["toy-org/night"] / UNET)
    weights["padding"] = torch.zeros(6_000_000)
    from safetensors.torch import save_file
    save_file(weights, hub.repos["toy-org/night"] / UNET)
    hub.cut_once.add(UNET)
    p = dmm_cli(tmp_path, hub.url, "fetch", "toy-org/night")
    if p.returncode != 0:  # the cut surfaced as a failure: the next run must resume, not restart
        one_sentence(p, 1, "toy-org/night")
        p = dmm_cli(tmp_path, hub.url, "fetch", "toy-org/night")
    assert p.returncode == 0, p.stderr
    assert any(r[2] and not r[2].startswith("bytes=0-") for r in hub.downloads(UNET)), hub.downloads(UNET)
    assert load_file(Path(p.stdout.strip()) / UNET).keys() == weights.keys()


def test_corrupt_cached_file_is_detected_and_fetched_again(hub, tmp_path):
    folder = Path(dmm_cli(tmp_path, hub.url, "fetch", "toy-org/night").stdout.strip())
    blob = Path(os.path.realpath(folder / UNET))
    data = bytearray(blob.read_bytes())
    data[-10:] = b"0123456789"
    blob.write_bytes(bytes(data))
    p = dmm_cli(tmp_path, hub.url, "fetch", "toy-org/night")
    assert p.returncode == 0, p.stderr
    assert "sha256 does not match" in p.stderr
    night = load_file(resolve("toy:night") / UNET)
    assert all(torch.equal(night[k], v) for k, v in load_file(folder / UNET).items())


def test_hub_failures_are_one_sentence(hub, tmp_path):
    one_sentence(dmm_cli(tmp_path, hub.url, "fetch", "toy-org/missing"), 2, "no such repo or file")
    one_sentence(dmm_cli(tmp_path, hub.url, "fetch", "toy-org/night/nope.safetensors"), 2, "no such repo or file")
    hub.status_for["toy-org/night"] = 401
    one_sentence(dmm_cli(tmp_path, hub.url, "fetch", "toy-org/night"), 1, "gated or private")
    hub.status_for["toy-org/night"] = 403
    one_sentence(dmm_cli(tmp_path, hub.url, "fetch", "toy-org/night"), 1, "set HF_TOKEN")
    one_sentence(dmm_cli(tmp_path, "http://127.0.0.1:9", "fetch", "toy-org/night"), 1,
                 "cannot reach the Hub; set HF_HUB_OFFLINE=1")
    one_sentence(dmm_cli(tmp_path, None, "fetch", "toy-org/night", offline=True), 1, "HF_HUB_OFFLINE")
    assert not list((tmp_path / "hf").rglob("*.safetensors"))


def test_pickle_only_repo_needs_allow_pickle(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(resolve("toy:outline"), repo, symlinks=False)
    weights = load_file(repo / UNET)
    (repo / UNET).unlink()
    torch.save(weights, repo / "unet" / "diffusion_pytorch_model.bin")
    with FakeHub() as server:
        server.add("toy-org/old", repo)
        one_sentence(dmm_cli(tmp_path, server.url, "fetch", "toy-org/old"), 2, "--allow-pickle")
        p = dmm_cli(tmp_path, server.url, "fetch", "toy-org/old", "--allow-pickle")
        assert p.returncode == 0, p.stderr
        converted = load_file(Path(p.stdout.strip()) / UNET)
        assert all(torch.equal(weights[k], converted[k]) for k in weights)


def test_single_file_round_trip_and_hub_single_file(tmp_path, dmm):
    r = dmm("fetch", "toy:checker", "--export-single-file", tmp_path / "checker.safetensors")
    assert r.code == 0, r
    single = tmp_path / "checker.safetensors"
    assert r.lines[-1] == str(single)
    back = dmm("fetch", single)
    assert back.code == 0, back
    for part in ("unet", "vae", "text_encoder"):
        original = {}
        for f in (resolve("toy:checker") / part).glob("*.safetensors"):
            original.update(load_file(f))
        converted = {}
        for f in (Path(back.lines[0]) / part).glob("*.safetensors"):
            converted.update(load_file(f))
        assert original.keys() == converted.keys()
        assert all(original[k].dtype == converted[k].dtype and torch.equal(original[k], converted[k])
                   for k in original)
    repo = tmp_path / "single-repo"
    repo.mkdir()
    shutil.copy(single, repo / "checker.safetensors")
    with FakeHub() as server:
        server.add("toy-org/single", repo)
        p = dmm_cli(tmp_path, server.url, "fetch", "toy-org/single/checker.safetensors")
        assert p.returncode == 0, p.stderr
        assert (Path(p.stdout.strip()) / "model_index.json").is_file()
        one_sentence(dmm_cli(tmp_path, server.url, "fetch", "toy-org/single"), 2, "toy-org/single/checker.safetensors")


def test_anime_realism_recipe_dry_runs_against_the_local_hub(tmp_path):
    """The real recipe's Hub ids, each served by the local Hub as a toy repo, resolve through fetch."""
    import yaml

    recipe = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "anime_realism.yaml").read_text())
    toys = ["night", "outline", "stripes", "checker"]
    with FakeHub() as server:
        server.add(recipe["base"], resolve("toy:base"))
        for teacher, toy in zip(recipe["teachers"], toys):
            server.add(teacher["model"], resolve(f"toy:{toy}"))
        p = dmm_cli(tmp_path, server.url, "distill", str(Path(__file__).parent.parent / "recipes" / "anime_realism.yaml"),
                    "--dry-run", "--json",
                    "--set", "data.folder=toy:shapes", "--set", "data.resolution=32", "-o", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["base"]["ref"] == recipe["base"]
    assert [t["ref"] for t in plan["teachers"]] == [t["model"] for t in recipe["teachers"]]
    assert all(COMMIT in t["folder"] for t in plan["teachers"])
    assert not (tmp_path / "run").exists()
