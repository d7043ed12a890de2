"""sha256 of weight files and components, cached under $DMM_HOME since SD weights take seconds to hash."""
from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from .. import console
from . import state
from .safetensors_header import weight_files

SHOWN_FROM = 1 << 30  # hashing a file this large takes seconds: it gets a progress bar


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {Path(path).name}",
                                     leave=False, disable=console.progress_disabled() or size < SHOWN_FROM) as bar:
        while block := f.read(chunk):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


_hash_cache_lock = threading.Lock()
HASH_CACHE = "sha256-cache.json"


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered by its real path, size and mtime, since SD weights take seconds to hash.

    Safe to call from several threads at once (hashing releases the GIL, so they run in parallel)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}:{st.st_size}:{st.st_mtime_ns}"
    with _hash_cache_lock:
        known = state.read_record(HASH_CACHE).get(key)
    if known is None:
        known = sha256_file(Path(real))
        with _hash_cache_lock:
            cache = state.read_record(HASH_CACHE)
            cache[key] = known
            state.write_record(HASH_CACHE, cache)
    return known


def component_sha256(component: Path) -> str:
    """One hash for a component's weights (a hash of the shards' hashes when it has several)."""
    digests = [cached_sha256(f) for f in weight_files(component)]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def component_sha256_many(components: list[Path]) -> list[str]:
    """component_sha256 of several components, hashed side by side."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(component_sha256, components))
