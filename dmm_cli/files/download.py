"""One file from a URL (weights that are not on the Hub): streamed into an atomic file with a progress bar,
kept only if it hashes to the sha256 it must have."""
from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from .. import console
from ..errors import NetworkError
from .atomic import atomic_file


def download_verified(url: str, target: Path, sha256: str, what: str) -> Path:
    """`target`, downloaded from `url`; a failed or wrong download leaves nothing behind."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_file(target) as tmp:
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"download {target.name}",
                                              disable=console.progress_disabled(), leave=False) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != sha256:
                raise NetworkError(f"{url}: the download is not {what} (its sha256 is {digest.hexdigest()[:12]}..., "
                                   f"not {sha256[:12]}...); nothing was kept")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise NetworkError(f"{url}: could not download {what} ({reason}); download it by hand to {target}") from e
    return target
