"""safetensors files read and written one tensor at a time, so memory holds a tensor, not a model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import ModelError
from .safetensors_header import read_header_and_start, weight_files


class TensorReader:
    """Reads tensors one at a time with plain reads, not a memory map, so the resident set stays at the
    tensors in hand however large the file (a mapped file's touched pages count as the process's memory)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header, _, self.start = read_header_and_start(path)
        self.file = open(path, "rb")

    def get(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in TORCH_DTYPES:
            raise ModelError(f"{self.path}: tensor {name} has dtype {entry['dtype']}, which dmm does not merge")
        raw = torch.empty(end - begin, dtype=torch.uint8)  # no zero-filling, unlike a bytearray
        self.file.seek(self.start + begin)
        if self.file.readinto(memoryview(raw.numpy())) != end - begin:
            raise ModelError(f"{self.path}: tensor {name} is cut short (the file changed while being read)")
        return raw.view(TORCH_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def close(self) -> None:
        self.file.close()


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def check_finite(tensor: torch.Tensor, where: Path, name: str) -> None:
    """NaN or Inf in an input weight is an error naming the file and the tensor.

    The extremes show both (a NaN makes them NaN) and take a twentieth of the time of isfinite."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if not all(map(math.isfinite, torch.aminmax(tensor.reshape(-1)))):
        raise ModelError(f"{where}: tensor {name} holds NaN or Inf values")


class StreamingWriter:
    """Writes a safetensors file tensor by tensor: the header (from shapes and dtypes) first, then the data.

    Tensors must be written in the order of `specs`; only one tensor is ever held here.
    """

    def __init__(self, file, specs: dict[str, tuple[torch.dtype, list[int]]], metadata: dict[str, str]):
        self.file, self.order, self.next = file, list(specs), 0
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, (dtype, shape) in specs.items():
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        self.specs = specs
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        file.write(len(raw).to_bytes(8, "little"))
        file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.next]
        dtype, shape = self.specs[name]
        if name != expected or tensor.dtype != dtype or list(tensor.shape) != list(shape):
            raise ValueError(f"tensor {name} written out of order or with the wrong dtype/shape")
        self.file.write(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())  # no copy
        self.next += 1


def read_component(component: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a pipeline component's folder (a unet/, a vae/), from all its weights files."""
    from safetensors import safe_open

    tensors = {}
    for f in weight_files(component):
        with safe_open(str(f), framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors
