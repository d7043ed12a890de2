"""Device and dtype choice from command-line words; torch only, so light commands stay light to import."""
from __future__ import annotations

import torch

from ..errors import BadInput

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise BadInput(f"--device: unknown device {requested!r} (use auto, cpu, cuda or cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"--device {requested}: no CUDA GPU is visible to torch")
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
