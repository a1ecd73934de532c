"""Embedding lookups read from the bundle file, row by row, instead of through a memory map.

A lookup needs only the rows of the tokens in the batch, but a memory-mapped table does not stay
that small: every page fault maps the pages around the faulting one too (the kernel's fault-around),
so a few thousand distinct tokens make almost the whole table resident in the server (43.6 of the
46.9 MiB embedding of the 100M-parameter example at concurrency 32). Reading each row with `pread`
puts only the rows of the current batch in the process's memory; the file's pages stay in the
kernel's page cache, which the kernel may drop and reread, and which is shared with every other
reader of the file.

Used only where nothing else reads the whole table: an embedding that the head ties to (tied
word embeddings) is read whole by the head's matmul every step, and keeps its memory map.

>>> rows = FileRows(ref)                     # a TensorRef from read_header  # doctest: +SKIP
>>> hidden = rows(torch.tensor([[5, 9, 5]]))  # (1, 3, dim), as embedding(ids)  # doctest: +SKIP
"""
from __future__ import annotations

import os

import torch

from planc.models.safetensors_index import TensorRef


class FileRows:
    """Rows of a 2-D tensor stored in a safetensors file, read with one `pread` per distinct row."""

    def __init__(self, ref: TensorRef):
        assert len(ref.shape) == 2, ref
        self.num_rows, self.dim = ref.shape
        self.dtype = ref.torch_dtype
        self._start = ref.start
        self._row_bytes = self.dim * self.dtype.itemsize
        self._file = open(ref.file, "rb", buffering=0)  # pread needs no file position: threads may share it

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> rows (..., dim), as `nn.Embedding` with this table as its weight."""
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        wanted = unique.tolist()
        if wanted and (wanted[0] < 0 or wanted[-1] >= self.num_rows):
            bad = wanted[0] if wanted[0] < 0 else wanted[-1]
            raise IndexError(f"index {bad} is out of range for an embedding of {self.num_rows} rows")
        rows = torch.empty(len(wanted), self.dim, dtype=self.dtype)
        buf = rows.view(torch.uint8).numpy()  # (rows, row bytes), written in place
        fd = self._file.fileno()
        for i, row in enumerate(wanted):
            got = os.preadv(fd, [buf[i]], self._start + row * self._row_bytes)
            if got != self._row_bytes:
                raise OSError(f"{self._file.name}: short read of embedding row {row}")
        return rows[inverse].reshape(*ids.shape, self.dim)

    def close(self) -> None:
        self._file.close()
