"""Device and dtype choice from command-line words; torch only, so light commands stay light to import."""
from __future__ import annotations

import torch

from ..errors import BadInput, DMMError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda", "mps"):
            raise BadInput(f"--device: unknown device {requested!r} (use auto, cpu, cuda, cuda:N or mps)")
        # A well-formed device this machine lacks is the environment's failure (exit 1), not the user's.
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DMMError(f"--device {requested}: no CUDA GPU is visible to torch")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise DMMError(f"--device {requested}: torch sees {torch.cuda.device_count()} CUDA GPU(s), "
                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise DMMError(f"--device {requested}: this torch has no Apple GPU (MPS) to use")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise BadInput(f"--dtype: unknown dtype {requested!r} (use auto, {', '.join(DTYPES)})")
    return DTYPES[requested]
