"""Downloads from the Hugging Face Hub through huggingface_hub (its cache, resume, progress bars and
HF_TOKEN / HF_ENDPOINT / HF_HUB_OFFLINE handling), limited to what an SD pipeline needs and verified
against the Hub's sha256 of every LFS file."""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .. import console
from ..errors import BadInput, ModelError, NetworkError
from ..files import state
from ..files.hashing import cached_sha256
from ..files.text import read_json
from .folders import PICKLE_SUFFIXES, copy_part, model_root
from .local import single_file_folder, usable_folder

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
TEXT_SUFFIXES = (".json", ".txt", ".model")


@dataclass
class Fetched:
    ref: str
    folder: str
    source: str  # local | single-file | hub, or the plug-in scheme (toy)
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None


def record(fetched: Fetched) -> None:
    """Remember where each reference came from (resolved commit included) in $DMM_HOME/fetched.json."""
    known = state.read_record("fetched.json")
    known[fetched.ref] = asdict(fetched)
    state.write_record("fetched.json", known)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_error(ref: str, e: Exception) -> Exception:
    """One sentence for each way the Hub can say no."""
    from huggingface_hub import errors

    if isinstance(e, errors.LocalEntryNotFoundError) and offline():
        return NetworkError(f"{ref}: not in the local cache, and HF_HUB_OFFLINE is set")
    if isinstance(e, errors.GatedRepoError) or getattr(getattr(e, "response", None), "status_code", None) in (401,
                                                                                                               403):
        return NetworkError(f"{ref}: gated or private: accept the licence on the model page and set HF_TOKEN")
    if isinstance(e, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError)):
        return BadInput(f"{ref}: no such repo or file on the Hub")
    if isinstance(e, errors.LocalEntryNotFoundError) or offline():
        if offline():
            return NetworkError(f"{ref}: not in the local cache, and HF_HUB_OFFLINE is set")
        return NetworkError(f"{ref}: cannot reach the Hub; set HF_HUB_OFFLINE=1 to use the cache")
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 404:
            return BadInput(f"{ref}: no such repo or file on the Hub")
        return NetworkError(f"{ref}: the Hub answered {status or 'an error'}")
    return NetworkError(f"{ref}: cannot reach the Hub; set HF_HUB_OFFLINE=1 to use the cache")


def select_files(files: dict[str, object], parts: list[str], variant: str | None, allow_pickle: bool,
                 ref: str) -> list[str]:
    """The files of each needed component: configs and tokenizer files, and one set of weights."""
    chosen = ["model_index.json"]
    for part in parts:
        inside = [f for f in files if f.startswith(part + "/") and "/" not in f[len(part) + 1:]]
        chosen += [f for f in inside if f.endswith(TEXT_SUFFIXES) and ".index." not in f]
        safetensors = [f for f in inside if f.endswith(".safetensors")]
        plain = [f for f in safetensors if "." not in Path(f).name.removesuffix(".safetensors")]
        wanted = [f for f in safetensors if f".{variant}" in Path(f).name] if variant else []
        weights = wanted or plain or safetensors
        if not weights:
            pickles = [f for f in inside if f.endswith(PICKLE_SUFFIXES)]
            if pickles and not allow_pickle:
                raise ModelError(f"{ref}: {part}/ has only pickle weights ({Path(pickles[0]).name}), which can run "
                                 "code when loaded; pass --allow-pickle to convert them (loaded with weights_only)")
            weights = pickles
        if not weights and part not in ("tokenizer", "tokenizer_2", "scheduler"):
            raise ModelError(f"{ref}: {part}/ has no weights on the Hub")
        index = [f for f in inside if f.endswith(".index.json") and any(w.split(".")[0] in f for w in weights)]
        chosen += weights + index
    return chosen


def download(repo: str, filename: str, commit: str, sha256: str | None, store: Path | None,
             repo_type: str = "model") -> Path:
    """One verified file: a corrupt cached copy is detected and fetched again."""
    from huggingface_hub import hf_hub_download

    kwargs = {"local_dir": store} if store is not None else {}
    for attempt in range(2):
        path = Path(hf_hub_download(repo, filename, revision=commit, force_download=attempt > 0, repo_type=repo_type,
                                    **kwargs))
        if sha256 is None or cached_sha256(path) == sha256:
            return path
        console.warn(f"{repo}/{filename}: sha256 does not match the Hub's; downloading it again")
        _evict(path)
    raise NetworkError(f"{repo}/{filename}: downloaded twice and the sha256 still differs from the Hub's")


def _expected_digest(file: Path, store: Path | None) -> str | None:
    """What a cached file must hash to: its blob's name in the Hub cache (sha256 for LFS files, the git blob
    sha1 for others), or the etag huggingface_hub recorded for a `--store` download; None if unknown."""
    if store is None:
        name = Path(os.path.realpath(file)).name
    else:
        meta = store / ".cache" / "huggingface" / "download" / f"{file.relative_to(store)}.metadata"
        lines = meta.read_text(encoding="utf-8", errors="replace").splitlines() if meta.is_file() else []
        name = lines[1].strip() if len(lines) > 1 else ""
    return name if len(name) in (40, 64) and all(c in "0123456789abcdef" for c in name) else None


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify_cached(ref: str, folder: Path, store: Path | None) -> None:
    """Check every cached file of an offline fetch against the digest its cache entry names (once per file:
    sha256 results are remembered), so a corrupted cache is refused, never used."""
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts):
        expected = _expected_digest(file, store)
        if expected is None:
            continue
        actual = cached_sha256(file) if len(expected) == 64 else _git_blob_sha1(file)
        if actual != expected:
            raise NetworkError(f"{ref}: the cached {file.relative_to(folder)} is corrupt (it does not hash to "
                               f"{expected[:12]}...); fetch it again with network access")


def _evict(path: Path) -> None:
    """Drop a bad file from the cache (the blob behind a snapshot link, too)."""
    real = Path(os.path.realpath(path))
    for p in {path, real}:
        if p.exists() or p.is_symlink():
            p.unlink()


def fetch_files(ref: str, repo: str, revision: str | None, choose: Callable[[list[str]], list[str]],
                patterns: list[str], nothing: str, repo_type: str = "model") -> Path:
    """The local snapshot of the files `choose` picks from a repo that is not a pipeline (a dataset, a CLIP model):
    pinned to one commit, each file verified; offline, the cached files matching `patterns`, verified once.
    `nothing`: what to say when the repo holds none of them."""
    from huggingface_hub import HfApi, snapshot_download

    if offline():
        try:
            folder = Path(snapshot_download(repo, repo_type=repo_type, revision=revision, local_files_only=True,
                                            allow_patterns=patterns))
        except Exception as e:  # every huggingface_hub failure becomes one sentence
            raise hub_error(ref, e) from e
        verify_cached(ref, folder, None)
        return folder
    try:
        info = HfApi().repo_info(repo, repo_type=repo_type, revision=revision, files_metadata=True)
        sha = {s.rfilename: (s.lfs.sha256 if s.lfs else None) for s in info.siblings or []}
        files = choose(list(sha))
        if not files:
            raise BadInput(f"{ref}: {nothing}")
        # the first by revision name, so the cache maps it to the commit and offline use finds it
        paths = [download(repo, name, info.sha if k else revision or "main", sha[name], None, repo_type=repo_type)
                 for k, name in enumerate(files)]
    except (BadInput, NetworkError, ModelError):
        raise
    except Exception as e:  # network trouble in the middle of a download
        raise hub_error(ref, e) from e
    return paths[0].parents[len(Path(files[0]).parts) - 1]


def fetch_hub(ref: str, repo: str, revision: str | None, path: str | None, *, allow_pickle: bool,
              variant: str | None, store: Path | None, prediction_type: str | None = None) -> Fetched:
    from huggingface_hub import HfApi, snapshot_download

    store = Path(store) / repo.replace("/", "--") if store is not None else None
    if offline():
        patterns = [path] if path else ["model_index.json", *(f"{p}/*" for p in PIPELINE_PARTS)]
        try:
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=True,
                                            **({"local_dir": store} if store else {})))
        except Exception as e:  # every huggingface_hub failure becomes one sentence
            raise hub_error(ref, e) from e
        verify_cached(ref, folder, store)
        if path:
            return Fetched(ref, str(single_file_folder(folder / path, allow_pickle, prediction_type)), "hub", repo,
                           revision)
        return Fetched(ref, str(usable_folder(folder)), "hub", repo, revision, folder.name)
    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except Exception as e:  # same: one sentence per failure kind
        raise hub_error(ref, e) from e
    files = {s.rfilename: s for s in info.siblings or []}
    sha = {name: (s.lfs.sha256 if s.lfs else None) for name, s in files.items()}
    try:
        if path:
            if path not in files:
                raise BadInput(f"{ref}: no such repo or file on the Hub")
            local = download(repo, path, info.sha, sha[path], store)
            fetched = Fetched(ref, str(single_file_folder(local, allow_pickle, prediction_type)), "single-file", repo,
                              revision, info.sha)
        else:
            if "model_index.json" not in files:
                singles = [f for f in files if f.endswith(".safetensors") and "/" not in f]
                hint = f"; name a file, e.g. {repo}/{singles[0]}" if singles else ""
                raise ModelError(f"{ref}: not a diffusers repo (no model_index.json){hint}")
            # by revision name first, so the cache maps it to the commit and offline use finds it
            index = read_json(download(repo, "model_index.json", revision or "main", None, store))
            parts = [p for p in PIPELINE_PARTS if p in index and index[p] and index[p][0] is not None]
            for name in select_files(files, parts, variant, allow_pickle, ref):
                download(repo, name, info.sha, sha.get(name), store)
            folder = download(repo, "model_index.json", info.sha, None, store).parent
            if allow_pickle:
                folder = _pickles_to_safetensors(folder)
            fetched = Fetched(ref, str(usable_folder(folder)), "hub", repo, revision, info.sha)
    except (BadInput, NetworkError, ModelError):
        raise
    except Exception as e:  # network trouble in the middle of a download
        raise hub_error(ref, e) from e
    record(fetched)
    return fetched


def _pickles_to_safetensors(folder: Path) -> Path:
    """A copy of `folder` whose pickle weights were loaded with weights_only=True and saved as safetensors."""
    import torch
    from safetensors.torch import save_file

    from ..files.atomic import atomic_folder

    pickles = [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if not pickles:
        return folder
    target = state.home() / "converted" / f"{folder.parent.parent.name}-{folder.name}"
    if (target / "model_index.json").is_file():
        return target
    state.store("converted")
    with atomic_folder(target, keep_existing=True) as tmp:
        copy_part(folder, tmp, model_root(folder), skip=PICKLE_SUFFIXES)
        for p in pickles:
            weights = torch.load(p, map_location="cpu", weights_only=True)
            name = "model.safetensors" if p.name.startswith("pytorch_model") else "diffusion_pytorch_model.safetensors"
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp / p.parent.relative_to(folder) / name)
    return target
