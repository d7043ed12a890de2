"""User-facing failures. Each carries one plain sentence and the exit code the CLI returns for it."""

import re


class DMMError(Exception):
    """A runtime failure the user can act on (exit code 1)."""

    exit_code = 1


class BadInput(DMMError):
    """Bad usage or bad input: a file, field, value or reference the user gave (exit code 2)."""

    exit_code = 2


class ModelError(BadInput):
    """A model reference or model folder that cannot be used."""


class RecipeError(BadInput):
    """A recipe that does not validate; the message names the file and the field path."""


class NetworkError(DMMError):
    """The Hub could not be reached or refused a download."""


class ProcessLost(DMMError):
    """Another process of a multi-process run died or stopped answering. The launcher then stops this one too:
    that stop signal is a consequence, so this error, not an interrupt, is what the user is told."""


class OutOfMemory(DMMError):
    """The GPU or the host ran out of memory: the environment, not the input (exit code 1)."""


# What each allocator says: CUDA's and MPS's OutOfMemoryError, the CPU allocator's RuntimeError, Python's MemoryError.
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")
_WANTED = re.compile(r"[Tt]ried to allocate (\d+(?:\.\d+)? ?[KMGT]i?B|\d+ bytes)")


def is_out_of_memory(error: BaseException) -> bool:
    """Recognised by class name and message, so this module needs no torch."""
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or isinstance(error, RuntimeError) and any(m in str(error) for m in _OUT_OF_MEMORY))


def out_of_memory(error: BaseException, doing: str, hint: str) -> OutOfMemory | None:
    """`error` as one sentence saying what ran out of memory while `doing` what, and `hint`; None if it is not an
    allocation failure."""
    if not is_out_of_memory(error):
        return None
    said = str(error)
    where = "the GPU" if "CUDA" in said or "GPU" in said or "MPS" in said else "the host"
    match = _WANTED.search(said)
    wanted = ""
    if match:
        amount = match.group(1)
        if amount.endswith(" bytes"):
            amount = f"{int(amount.split()[0]) / 2**30:.2f} GiB"
        wanted = f" (an allocation of {amount} failed)"
    return OutOfMemory(f"{where} ran out of memory {doing}{wanted}; {hint}")
