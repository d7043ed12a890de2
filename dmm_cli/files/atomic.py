"""Atomic writes: a crash or Ctrl-C never leaves a half-written file where a good one was.

Temporary files and folders sit beside their target as `.NAME.*.tmp` (and a replaced folder as
`.NAME.*.old` until the new one is in place); `remove_leftovers` clears what a killed process left.
Outputs get the usual permissions (0666/0777 less the umask), whatever the library that wrote them.
One process at a time writes an output: `output_lock`.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import BadInput, DMMError
from ..interrupts import deferred
from .safetensors_header import read_metadata


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: Path) -> None:
    """Give `path` (and all inside it) the permissions a new file gets; some writers make files 0600."""
    mask = _umask()
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for folder, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(folder, d), 0o777 & ~mask)
            for f in files:
                if not os.path.islink(os.path.join(folder, f)):
                    os.chmod(os.path.join(folder, f), 0o666 & ~mask)


def _disk_full(error: BaseException, where: Path) -> bool:
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error):
        return True
    try:  # torch.save reports a full disk as a bare position mismatch
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def _no_space(path: Path, error: BaseException) -> DMMError:
    return DMMError(f"{path}: no space left on the device while writing it ({error.__class__.__name__}); free some "
                    "space, or write elsewhere: another output, or another $DMM_HOME for dmm's caches")


@contextlib.contextmanager
def _making_room(path: Path):
    """Creating `path`'s folder or a file beside it: a failure is one sentence naming `path` and why."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(path, e) from None
        found = next((p for p in path.absolute().parents if p.exists()), None)
        why = (f"{found} is a file, not a folder" if found is not None and not found.is_dir()
               else (e.strerror or type(e).__name__).lower())
        raise BadInput(f"{path}: cannot write there ({why})") from None


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    with _making_room(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            yield Path(tmp)
        except Exception as e:
            if _disk_full(e, path.parent):
                raise _no_space(path, e) from e
            raise
        _public(Path(tmp))
        os.replace(tmp, path)
    finally:
        with deferred():  # a second Ctrl-C must not leave the temporary behind
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path: Path, keep_existing: bool = False):
    """Yield a temporary folder beside `path`; on success it takes the place of `path`.

    An existing folder at `path` is moved aside first and deleted only once the new one is in place;
    interrupts wait until both renames are done. With `keep_existing` (a cache whose content depends only
    on its name), a folder another process put there meanwhile is kept and ours dropped, so readers of
    it are never pulled from under.
    """
    path = Path(path)
    with _making_room(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        try:
            yield tmp
        except Exception as e:
            if _disk_full(e, path.parent):
                raise _no_space(path, e) from e
            raise
        _public(tmp)
        with deferred():
            old = None
            if path.exists() and keep_existing:
                return
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, old / path.name)
            os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        with deferred():  # a second Ctrl-C must not leave the temporary behind
            if tmp.exists():
                shutil.rmtree(tmp)


def _clear(leftover: Path, target: Path) -> None:
    if leftover.suffix == ".old" and not target.exists() and (leftover / target.name).exists():
        os.replace(leftover / target.name, target)  # the replacement never arrived: put the old one back
    if leftover.is_dir() and not leftover.is_symlink():
        shutil.rmtree(leftover)
    else:
        leftover.unlink()


def remove_leftovers(path: Path) -> None:
    """Delete the temporaries a killed writer of `path` left beside it (call it holding `output_lock`)."""
    path = Path(path)
    for leftover in sorted(path.parent.glob(f".{path.name}.*")):
        if leftover.suffix in (".tmp", ".old") and leftover.name[len(path.name) + 2:].count(".") == 1:
            _clear(leftover, path)


def clear_temporaries(folder: Path) -> None:
    """Delete every temporary a killed writer left in `folder`, a folder dmm owns (a run folder, say)."""
    if not Path(folder).is_dir():
        return
    for leftover in sorted(Path(folder).glob(".*.*")):
        if leftover.suffix in (".tmp", ".old"):
            _clear(leftover, leftover.parent / leftover.name[1:].rsplit(".", 2)[0])


@contextlib.contextmanager
def output_lock(path: Path):
    """Hold `.NAME.lock` beside `path` for the duration; a second writer of the same output stops at once.

    The lock is the kernel's (flock), so it dies with the process that holds it; the file is removed on
    release, and a writer that locked a file already removed tries again.
    """
    path = Path(path).absolute()
    lock = path.parent / f".{path.name}.lock"
    while True:
        with _making_room(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DMMError(f"{path}: another dmm process{f' (pid {holder})' if holder else ''} is writing this "
                           "output; wait for it to finish or choose another output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
        yield
    finally:
        os.unlink(lock)
        os.close(fd)


def check_replaceable(path: Path, overwrite: bool, command: str, key: str) -> None:
    """An existing output is replaced only with --overwrite, and only if `dmm {command}` wrote it: its weights (the
    file itself, a pipeline folder's UNet, or a LoRA folder's file) carry the metadata `key`. Never an arbitrary
    file or folder."""
    if not path.exists():
        return
    if not overwrite:
        raise BadInput(f"--output {path}: already exists; pass --overwrite to replace it")
    files = [path] if path.is_file() else sorted([*(path / "unet").glob("*.safetensors"),
                                                  *path.glob("*.safetensors")])
    try:
        ours = any(key in read_metadata(f) for f in files)
    except BadInput:
        ours = False
    if not ours:
        raise BadInput(f"--output {path}: exists and was not written by dmm {command}, so --overwrite will not "
                       "replace it; choose another --output")


def writable_folder(path: Path) -> bool:
    """True if `path` exists as a writable folder or could be created as one; leaves nothing behind.
    Tried, not asked: permission bits say yes to root under /proc or on a read-only mount."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dmm-probe-", suffix=".tmp", dir=path))
    except OSError:
        return False
    return True
