"""Training pictures without a hand-made folder: parquet shards, Hub dataset repos, pictures that do not decode."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import assert_one_sentence_error
from hub_server import FakeHub


def picture(k: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), ((37 * k) % 255, (91 * k) % 255, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


def parquet_dataset(folder: Path, rows: int = 24, shards: int = 2, caption: str = "text", broken: int = -1) -> Path:
    """Shards as the `datasets` library writes them: an Image struct column and a caption column; picture number
    `broken` does not decode."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    per = rows // shards
    for s in range(shards):
        ks = range(s * per, (s + 1) * per)
        table = pa.table({"image": [{"bytes": b"not a png" if k == broken else picture(k), "path": None} for k in ks],
                          caption: [f"a red circle number {k}" for k in ks]})
        pq.write_table(table, folder / "data" / f"train-{s:05d}-of-{shards:05d}.parquet")
    return folder


def image_folder(folder: Path, rows: int, broken: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(rows):
        (folder / f"{k:03d}.png").write_bytes(b"not a png" if k < broken else picture(k))
        lines.append(json.dumps({"file_name": f"{k:03d}.png", "text": "a blue square"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def recipe(tmp_path: Path, folder: str, **data) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "data", "base": "toy:base", "teachers": [{"name": "night", "model": "toy:night"}],
        "data": {"folder": folder, "resolution": 32, **data}, "output": str(tmp_path / "run"),
        "train": {"max_steps": 2, "batch_size": 4}}))
    return path


def test_local_parquet_shards_train_and_the_dry_run_counts_them(dmm, tmp_path):
    data = parquet_dataset(tmp_path / "set")
    r = dmm("distill", recipe(tmp_path, str(data)), "--dry-run", "--json")
    assert r.code == 0, r
    plan = json.loads(r.out)["data"]
    # 24 latents of 4 fp32 channels, 8 x 8: the toy VAE makes 32 px pictures 4 times smaller
    assert plan["images"] == 24 and plan["bytes"] > 0 and plan["latent_cache_bytes"] == 24 * 4 * 8 * 8 * 4
    r = dmm("distill", recipe(tmp_path, str(data)))
    assert r.code == 0, r
    assert "encoding 24 images" in r.err


def test_a_missing_caption_column_is_named_and_no_run_folder_is_left(dmm, tmp_path):
    data = parquet_dataset(tmp_path / "set", caption="caption")
    r = dmm("distill", recipe(tmp_path, str(data)))
    assert_one_sentence_error(r, 2, "no column 'text' for data.caption_column", "caption")
    assert not (tmp_path / "run").exists()
    r = dmm("distill", recipe(tmp_path, str(data), caption_column="caption", image_column="pixels"))
    assert_one_sentence_error(r, 2, "no column 'pixels' for data.image_column")


def test_pictures_that_do_not_decode_are_skipped_then_counted_against_a_share(dmm, tmp_path):
    few = image_folder(tmp_path / "few", rows=40, broken=1)
    r = dmm("distill", recipe(tmp_path, str(few)))
    assert r.code == 0, r
    assert "skipped 1 of 40 pictures" in r.err and "encoding 40 images" in r.err
    every = image_folder(tmp_path / "every", rows=6, broken=6)
    r = dmm("distill", recipe(tmp_path / "b", str(every)))
    assert_one_sentence_error(r, 2, "6 of 6 pictures do not decode", f"(the first: {every / '000.png'})")
    assert not (tmp_path / "b" / "run").exists()
    shards = parquet_dataset(tmp_path / "set", rows=24, broken=14)
    r = dmm("distill", recipe(tmp_path / "c", str(shards), max_bad_fraction=0.0))
    assert_one_sentence_error(r, 2, f"(the first: {shards / 'data' / 'train-00001-of-00002.parquet'} row 2)")


def dmm_with_hub(tmp_path: Path, hub: FakeHub, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(DMM_HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=hub.url,
               HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "dmm_cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_a_hub_dataset_repo_is_listed_for_the_dry_run_then_fetched_verified_and_trained_on(tmp_path):
    with FakeHub() as hub:
        hub.add("datasets/toy-org/circles", parquet_dataset(tmp_path / "repo", rows=16))
        r = recipe(tmp_path, "datasets/toy-org/circles")
        dry = dmm_with_hub(tmp_path, hub, "distill", str(r), "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "rows counted on download" in dry.stdout and not hub.downloads()
        p = dmm_with_hub(tmp_path, hub, "-q", "distill", str(r))
        assert p.returncode == 0, p.stderr
        assert len(hub.downloads(".parquet")) == 2
        missing = dmm_with_hub(tmp_path, hub, "distill", str(recipe(tmp_path / "m", "datasets/toy-org/nothing")))
    assert missing.returncode == 2 and "datasets/toy-org/nothing: no such repo or file on the Hub" in missing.stderr
    assert not (tmp_path / "m" / "run").exists()


@pytest.mark.parametrize("value, fragment", [
    ("data.max_bad_fraction=2", "data.max_bad_fraction: must be <= 1"),
    ("data.resolution=30", "data.resolution: must be a multiple of 8"),
])
def test_bad_data_settings(dmm, tmp_path, value, fragment):
    r = dmm("distill", recipe(tmp_path, "toy:shapes"), "--set", value)
    assert_one_sentence_error(r, 2, fragment)
    assert not (tmp_path / "run").exists()


def _listing_out(tmp_path: Path, how: str) -> Path:
    """A data folder whose second picture is named by a path, or is a link, that leads out of the folder."""
    outside = tmp_path / "private.png"
    outside.write_bytes(picture(99))
    if how == "parquet":
        folder = tmp_path / "set"
        folder.mkdir()
        cells = [{"bytes": picture(0), "path": None}, {"bytes": None, "path": "../private.png"}]
        pq.write_table(pa.table({"image": cells, "text": ["a", "b"]}), folder / "train.parquet")
        return folder
    folder = image_folder(tmp_path / "set", rows=2)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    if how == "link":
        (folder / rows[1]["file_name"]).unlink()
        (folder / rows[1]["file_name"]).symlink_to(outside)
    else:
        rows[1]["file_name"] = {"climbing": "../private.png", "absolute": str(outside)}[how]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("how", ["climbing", "absolute", "link", "parquet"])
def test_a_picture_outside_the_data_folder_is_never_read(dmm, tmp_path, how):
    folder = _listing_out(tmp_path, how)
    r = dmm("distill", recipe(tmp_path, str(folder)))
    assert_one_sentence_error(r, 2, "leads outside the data folder", "private.png" if how != "link" else "001.png")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage, fragment", [
    (lambda folder: (folder / "metadata.jsonl").write_bytes(b'{"file_name": "000.png", "text": "caf\xe9"}\n'),
     "metadata.jsonl: not UTF-8 text"),
    (lambda folder: (folder / "metadata.jsonl").write_text('{"file_name": "000.png", "text": null}\n'),
     "metadata.jsonl: line 1: text must be a string"),
    (lambda folder: (folder / "metadata.jsonl").write_text('{"file_name": "nothing.png", "text": "a"}\n'),
     "metadata.jsonl: line 1: nothing.png is listed but is not a file in the folder"),
    (lambda folder: ((folder / "metadata.jsonl").unlink(), (folder / "000.txt").write_bytes(b"caf\xe9")),
     "000.txt: not UTF-8 text"),
])
def test_a_bad_listing_or_caption_is_named(dmm, tmp_path, damage, fragment):
    folder = image_folder(tmp_path / "set", rows=2)
    damage(folder)
    assert_one_sentence_error(dmm("distill", recipe(tmp_path, str(folder)), "--dry-run"), 2, fragment)


def test_a_hub_picture_folder_trains_through_the_cache_links(tmp_path):
    """A Hub snapshot's files are links into the cache's blobs: inside the dataset, so they are read."""
    with FakeHub() as hub:
        hub.add("datasets/toy-org/squares", image_folder(tmp_path / "repo", rows=6))
        p = dmm_with_hub(tmp_path, hub, "-q", "distill", str(recipe(tmp_path, "datasets/toy-org/squares")))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "run" / "unet").is_dir()


def test_pictures_read_as_they_look(tmp_path):
    """A 16-bit or float grey keeps its brightness (PIL's own conversion clips it to white or black), and a photo's
    EXIF orientation is applied."""
    import numpy as np

    from dmm_cli.data.sources import open_images

    folder = tmp_path / "set"
    folder.mkdir()
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(folder / "grey16.png")
    Image.fromarray(np.full((16, 16), 0.25, np.float32)).save(folder / "float.tif")
    turned = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = turned.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    turned.save(folder / "turned.jpg", exif=exif)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n"
                                                   for n in ("grey16.png", "float.tif", "turned.jpg")))
    pictures = {caption: picture for picture, caption in open_images(folder)}
    assert all(p.mode == "RGB" for p in pictures.values())
    assert np.asarray(pictures["grey16.png"]).mean() == pytest.approx(40000 / 257, abs=1)
    assert np.asarray(pictures["float.tif"]).mean() == pytest.approx(0.25 * 255, abs=1)
    assert pictures["turned.jpg"].size == (20, 40)


def test_a_picture_past_pils_warning_size_reads_without_a_raw_warning(tmp_path):
    """PIL warns of pictures past 89 megapixels as a Python warning, printed with its source line; dmm reads them
    (and refuses, as a picture that does not decode, those past twice that)."""
    import warnings

    from dmm_cli.data.sources import open_images

    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("L", (10_000, 9_000), 128).save(folder / "large.png")  # 90 megapixels
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "large.png", "text": "large"}) + "\n")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        [(picture, caption)] = list(open_images(folder))
    assert picture.size == (10_000, 9_000) and caption == "large"
    assert not [w for w in said if issubclass(w.category, Image.DecompressionBombWarning)]
