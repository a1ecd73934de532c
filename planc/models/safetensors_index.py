"""Read safetensors files lazily: headers once, one tensor's bytes at a time.

Only the JSON header is parsed when a checkpoint is opened, so opening 64 variants costs almost no
memory; tensors are read (or hashed) one at a time when a pass needs them. A file shorter than its
header promises is refused as truncated.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from planc.errors import CheckpointError
from planc.jsonfile import read_json_object

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie: absolute offsets into a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def read(self) -> torch.Tensor:
        data = bytearray(self.nbytes)
        with open(self.file, "rb") as f:
            f.seek(self.start)
            got = f.readinto(data)  # one copy: straight into the tensor's buffer
        if got != self.nbytes:
            raise CheckpointError(f"{self.file}: truncated while reading a tensor")
        if not data:
            return torch.empty(self.shape, dtype=self.torch_dtype)
        return torch.frombuffer(data, dtype=self.torch_dtype).reshape(self.shape)

    def chunks(self) -> Iterator[bytes]:
        with open(self.file, "rb") as f:
            f.seek(self.start)
            left = self.nbytes
            while left:
                buf = f.read(min(left, _CHUNK))
                if not buf:
                    raise CheckpointError(f"{self.file}: truncated while reading a tensor")
                left -= len(buf)
                yield buf


def read_header(path: Path) -> dict[str, TensorRef]:
    """Tensor name -> TensorRef for one safetensors file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {header_len} bytes "
                                      f"in a file of {size} bytes)")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + header_len
    out: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which planc does not load")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} needs {base + end} bytes, the file has {size}")
        if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} {dtype}")
        out[name] = TensorRef(path, dtype, shape, base + begin, base + end)
    return out


def read_checkpoint_tensors(directory: Path) -> tuple[dict[str, TensorRef], list[Path]]:
    """All tensors of an HF checkpoint directory: model.safetensors, or shards named by the index."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a `weight_map` object)")
        files = sorted({directory / f for f in weight_map.values()})
        tensors: dict[str, TensorRef] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: names shard {f.name}, which does not exist")
            tensors.update(read_header(f))
        for name, f in weight_map.items():
            if name not in tensors or tensors[name].file.name != Path(f).name:
                raise CheckpointError(f"{index}: tensor {name!r} is not in shard {f}")
        return tensors, files
    if single.is_file():
        return read_header(single), [single]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(f"{directory}: only pickle checkpoints (*.bin/*.pt) found; planc reads safetensors "
                              "(convert with save_pretrained(safe_serialization=True))")
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
