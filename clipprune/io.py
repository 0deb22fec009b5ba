"""Atomic output writing: a stage killed halfway never leaves a half-written file for DVC to cache."""

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import ClipPruneError

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, fsync, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the permissions open() would give
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as JSON (sorted keys, indent 2) atomically."""
    # allow_nan=False: NaN/Infinity are not JSON; fail here rather than in whoever parses the file later.
    return write_bytes_atomic(path, (json.dumps(obj, sort_keys=True, indent=2, allow_nan=False) + "\n").encode())


def torch_bytes(obj: Any) -> bytes:
    """torch.save into memory: the zip's record names then do not depend on the file name, so equal
    content gives equal bytes wherever it is written (DVC hashes and the byte-identity tests rely on it)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_torch_atomic(path: str | Path, obj: Any) -> Path:
    return write_bytes_atomic(path, torch_bytes(obj))


def check_writable(*dirs: str | Path) -> None:
    """Refuse, before any work, output directories this process cannot create or write into: one line naming the
    path and the fix, never a PermissionError after an hour of search. Creates nothing (the probe file is
    removed at once)."""
    for d in map(Path, dirs):
        at = d
        while not os.path.lexists(at):  # where the first missing directory would be made
            at = at.parent
        if not at.is_dir():
            raise ClipPruneError(f"cannot write {d}/: {at} is not a directory; move it away or change the output path")
        try:
            tempfile.TemporaryFile(dir=at).close()
        except OSError as e:
            raise ClipPruneError(f"cannot write {d}/: {at}/ is not writable ({e.strerror}); make it writable "
                                 f"(chmod u+w {at}) or run from a checkout you own") from None
