"""Write files so that a reader never sees half of one: write a temp file beside it, then rename."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import PipelineError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success rename it onto `path`.

    The temp file sits in the same folder so the rename stays on one filesystem (atomic on POSIX).
    On any error the temp file is removed and the old `path`, if any, is left untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise StoreWriteError(_cannot_write(path, err)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        give_ordinary_permissions(tmp_path)  # mkstemp makes 0600
        os.replace(tmp_path, path)
    except OSError as err:  # a full disk, a file-size limit, a folder made read-only meanwhile
        raise StoreWriteError(_cannot_write(path, err)) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


class StoreWriteError(PipelineError, OSError):
    """A file that could not be written; what was there before is left as it was."""


def _cannot_write(path: Path, err: OSError) -> str:
    return (f"cannot write {path}: {err.strerror or err}. Nothing there was changed; free disk space or "
            "make the folder writable (or set STORE_DIR to one that is), then run the stage again.")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    # numpy / torch scalars and paths turn up in settings and metrics
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """torch.save of plain data (tensors, dicts, lists, numbers, strings): what torch.load reads back
    with weights_only=True, which runs no code."""
    import torch

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch reports a failed write (a full disk, say) as RuntimeError
            raise StoreWriteError(_cannot_write(Path(path), OSError(str(err)))) from None


def give_ordinary_permissions(path: str | os.PathLike) -> None:
    """rw for the owner, read for the rest as the umask allows (0644 under the usual 022): colleagues on a
    shared store can read what a stage wrote, whatever mode the library that wrote it chose."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
