"""Safetensors files whose all-zero tensors are left as holes of the file (a sparse file): a
multi-GB text encoder whose matrices are zeros is written in a moment, takes no disk blocks where
the file system supports holes, and reads back as zeros (safetensors, mmap). The format is the
documented safetensors layout: an 8-byte little-endian header length, the JSON header (padded with
spaces to 8 bytes), then the tensors' bytes back to back in the order of their offsets.
"""

from __future__ import annotations

import json
import os

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def save_sparse(state: dict, path: str) -> None:
    """Write ``state`` ({name: tensor}) as a safetensors file; a tensor on the meta device stands
    for zeros of its shape and dtype: nothing is allocated for it and its bytes are a hole."""
    names = sorted(state)
    header, end = {}, 0
    for name in names:
        t = state[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [end, end + size]}
        end += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in names:
            t = state[name]
            if t.device.type != "meta":
                f.seek(start + header[name]["data_offsets"][0])
                f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        f.truncate(start + end)


def write_once(path: str, build) -> str:
    """``path``, written by ``save_sparse(build(), ...)`` into a temporary name first if missing."""
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        save_sparse(build(), tmp)
        os.replace(tmp, path)
    return path
