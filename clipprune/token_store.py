"""A token cache on disk: rows of one shape and dtype appended batch by batch to a temporary file, read back by index.

    with TokenStore(rows=m, row_shape=(197, 768), directory=tmp) as store:
        for x in batches:
            store.append(x)
        x = store[idx]  # [len(idx), 197, 768]: a fresh tensor, read from the file now

The predictor trains on the layer-L tokens of every ranked image: 50,500 Food-101 images at ViT-B/16 are 31 GB of
float32, so they live on disk and host RAM holds one mini-batch. Reads are explicit preads into a fresh tensor,
never a memory map: the mapped pages that random mini-batches touch stay resident and count in the process's RSS,
while pread goes through the page cache, which the kernel gives back under pressure.

The file has no name (tempfile.TemporaryFile: O_TMPFILE, or unlinked as soon as it is made), so its disk space is
freed when the store is closed or the process ends, however it ends: nothing is left behind to clean up.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .errors import ClipPruneError

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_space(directory: str | Path, nbytes: int, *, what: str) -> None:
    """One clear error before hours of compute, rather than a full disk halfway through."""
    free = shutil.disk_usage(directory).free
    if nbytes > free:
        raise ClipPruneError(f"{what} needs {nbytes / 1e9:.1f} GB in {directory} but only {free / 1e9:.1f} GB are "
                             f"free; free some space there or point TMPDIR at a disk with more")


def _bytes(t: Tensor) -> memoryview:
    """The tensor's memory as bytes, for pread/pwrite (through an int16 view: numpy has no bfloat16)."""
    return memoryview((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()).cast("B")


class TokenStore:
    """`rows` rows of `row_shape` in `dtype`, in an unnamed file under `directory`; `len`, `shape` and
    `store[index]` (a 1-D index tensor, any order and repeats, or a step-1 slice) as for a tensor."""

    def __init__(self, *, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 directory: Optional[str | Path] = None):
        if dtype not in DTYPES:
            raise ValueError(f"TokenStore dtype must be one of {DTYPES}, got {dtype}")
        directory = Path(directory if directory is not None else tempfile.gettempdir())
        if not directory.is_dir():
            raise ClipPruneError(f"token store directory {directory} does not exist; create it or point TMPDIR elsewhere")
        self.capacity, self.row_shape, self.dtype = rows, tuple(row_shape), dtype
        self.row_bytes = math.prod(self.row_shape) * dtype.itemsize
        self.rows = 0  # written so far
        check_space(directory, rows * self.row_bytes,
                    what=f"the token cache ({rows} x {list(self.row_shape)} {str(dtype).removeprefix('torch.')})")
        self.directory = directory
        self.file = tempfile.TemporaryFile(dir=directory, prefix="clipprune-tokens-")

    # -------------------------------------------------------------------------------------------- tensor-like
    def __len__(self) -> int:
        return self.rows

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, *self.row_shape))

    def append(self, x: Tensor) -> None:
        """Write rows [len(x), *row_shape] after the last ones (cast to the store's dtype)."""
        x = x.detach().to("cpu", self.dtype).contiguous()
        if tuple(x.shape[1:]) != self.row_shape or self.rows + len(x) > self.capacity:
            raise ValueError(f"cannot append {list(x.shape)} to a store of {self.rows}/{self.capacity} rows "
                             f"of {list(self.row_shape)}")
        buf, offset = _bytes(x), self.rows * self.row_bytes
        while buf:  # pwrite may write less than asked
            n = os.pwrite(self.file.fileno(), buf, offset)
            buf, offset = buf[n:], offset + n
        self.rows += len(x)

    def _read(self, buf: memoryview, offset: int) -> None:
        while buf:  # preadv may read less than asked (at most ~2 GB a call on Linux)
            n = os.preadv(self.file.fileno(), [buf], offset)
            if n == 0:
                raise EOFError(f"token store file ends before byte {offset}")
            buf, offset = buf[n:], offset + n

    def __getitem__(self, index: Tensor | slice) -> Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.rows)
            if step != 1:
                raise IndexError("TokenStore slices must have step 1")
            out = torch.empty((max(0, stop - start), *self.row_shape), dtype=self.dtype)
            self._read(_bytes(out), start * self.row_bytes)  # contiguous rows: one read
            return out
        rows = torch.as_tensor(index).reshape(-1).tolist()
        if any(not 0 <= r < self.rows for r in rows):
            raise IndexError(f"TokenStore index out of range [0, {self.rows})")
        out = torch.empty((len(rows), *self.row_shape), dtype=self.dtype)
        view, rb = _bytes(out), self.row_bytes
        for pos in sorted(range(len(rows)), key=rows.__getitem__):  # ascending offsets: kinder to the disk
            self._read(view[pos * rb : (pos + 1) * rb], rows[pos] * rb)
        return out

    # ---------------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Frees the file's disk space (it has no name, so closing is deleting)."""
        self.file.close()

    def __enter__(self) -> "TokenStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
