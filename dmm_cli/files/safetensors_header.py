"""safetensors headers, read and checked the way the safetensors library checks them, without torch.

A file is 8 bytes of little-endian header length N, N bytes of UTF-8 JSON (tensor name -> dtype,
shape, data_offsets; plus an optional `__metadata__` of strings), then the tensor data. Every
tensor's byte range must match its dtype and shape, and the ranges must tile the data exactly up
to the end of the file: a truncated, padded or lying file is refused before any tensor is read.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import ModelError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def weight_files(component: Path) -> list[Path]:
    """The safetensors files of one pipeline component folder (e.g. unet/), sharded or not, sorted."""
    files = sorted(Path(component).glob("*.safetensors"))
    plain = [f for f in files if "." not in f.name.removesuffix(".safetensors")]
    files = plain or files  # a variant (name.fp16.safetensors) only when it is all there is
    if not files:
        raise FileNotFoundError(f"{component}: no .safetensors weights")
    return files


def _invalid(path: Path, why: str) -> ModelError:
    return ModelError(f"{path}: not a valid safetensors file ({why})")


def read_header_and_start(path: Path) -> tuple[dict, dict, int]:
    """(tensors, metadata, offset of the data) of a checked safetensors file."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            first = f.read(8)
            length = int.from_bytes(first, "little") if len(first) == 8 else -1
            if length > MAX_HEADER_BYTES:
                raise _invalid(path, f"a header of {length} bytes, over the {MAX_HEADER_BYTES} limit")
            if length < 2 or 8 + length > size:
                raise _invalid(path, "empty or truncated")
            raw = f.read(length)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _invalid(path, "header is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise _invalid(path, f"header is not JSON: {e.msg}") from None
    if not isinstance(header, dict):
        raise _invalid(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(path, "__metadata__ must map names to strings")
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = dtype in DTYPE_SIZES and all(isinstance(d, int) and d >= 0 for d in shape) \
                and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise _invalid(path, f"tensor {name} has a malformed entry")
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise _invalid(path, f"tensor {name} spans {end - begin} bytes, not the {math.prod(shape)} x "
                                 f"{DTYPE_SIZES[dtype]} its dtype and shape need")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _invalid(path, f"tensor {name} {'overlaps another' if begin < position else 'leaves a gap'}")
        position = end
    if 8 + length + position != size:
        raise _invalid(path, f"the data should end at byte {8 + length + position} but the file has {size} bytes"
                             + (" (truncated)" if size < 8 + length + position else ""))
    return header, metadata, 8 + length


def read_header(path: Path) -> dict:
    """A checked safetensors file's tensors (name -> dtype, shape, data_offsets), without reading their data."""
    return read_header_and_start(path)[0]


def read_metadata(path: Path) -> dict[str, str]:
    return read_header_and_start(path)[1]


def component_header(component: Path) -> dict[str, dict]:
    """The checked headers of a component's weights files as one: name -> dtype, shape, data_offsets."""
    tensors: dict[str, dict] = {}
    for f in weight_files(component):
        tensors.update(read_header(f))
    return tensors


def component_shapes(component: Path) -> dict[str, list[int]]:
    return {k: v["shape"] for k, v in component_header(component).items()}
