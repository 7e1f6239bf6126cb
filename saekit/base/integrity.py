"""Checksums written with every artifact and checked on read, and sets of files published as one.

Three tools, one rule: a later stage never uses a file that is corrupt, truncated, or from another
set than its neighbours, without saying so in one line that names the file and the stage to rerun.

- `sha256_file` / `verify_file`: the checksum of a binary file (a shard, a token file), kept in the
  JSON that describes it and compared when the file is first opened.
- `write_sealed_json` / `read_sealed_json`: a JSON file that carries the checksum of its own content
  under the key "sha256", so a flipped byte that still parses is caught too.
- `publish_set` / `open_set`: files that belong together are written into `<name>.partial/`, listed
  with their checksums in a sealed `manifest.json`, renamed to their final folder in one step, and
  only then named current by a pointer file. A kill at any point leaves the previous set current.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from .atomic import write_text
from .errors import PipelineError

CHECKSUM_KEY = "sha256"
MANIFEST = "manifest.json"
_CHUNK = 1 << 22


class IntegrityError(PipelineError):
    """An artifact that is corrupt, truncated, or does not belong with the others."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike, expected: str, rerun: str) -> None:
    """Stop with one line if `path` is missing or its checksum is not `expected`."""
    path = Path(path)
    if not path.exists():
        raise IntegrityError(f"{path} is missing. {rerun}")
    if sha256_file(path) != expected:
        raise IntegrityError(f"{path} is corrupt (its checksum does not match the one written with it). {rerun}")


def content_digest(obj: Any) -> str:
    """SHA-256 of a nest of dicts, lists, tensors/arrays and JSON values, independent of how it is
    stored: what a file that holds weights records about itself, and checks when read back."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=str):
                digest.update(json.dumps(str(key)).encode())
                feed(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        elif hasattr(value, "detach") or hasattr(value, "tobytes"):
            array = value.detach().cpu().contiguous().numpy() if hasattr(value, "detach") else value
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
        else:
            digest.update(json.dumps(value, default=str).encode())

    feed(obj)
    return digest.hexdigest()


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with the checksum of its canonical JSON form added under "sha256"."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    # round-trip first so the checksum is of exactly what a reader will parse back
    body = json.loads(_canonical(body))
    return {**body, CHECKSUM_KEY: hashlib.sha256(_canonical(body)).hexdigest()}


def write_sealed_json(path: str | os.PathLike, obj: dict[str, Any]) -> dict[str, Any]:
    sealed = seal(obj)
    write_text(path, json.dumps(sealed, indent=2) + "\n")
    return sealed


def read_sealed_json(path: str | os.PathLike, rerun: str) -> dict[str, Any]:
    """The content of a sealed JSON file, or one line saying it is missing, unreadable or altered."""
    path = Path(path)
    if not path.exists():
        raise IntegrityError(f"{path} is missing. {rerun}")
    try:
        obj = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{path} is not valid JSON (truncated or corrupt: {err}). {rerun}") from None
    if not isinstance(obj, dict) or CHECKSUM_KEY not in obj:
        raise IntegrityError(f"{path} carries no checksum (written by an older version, or not by this "
                             f"project). {rerun}")
    if seal(obj)[CHECKSUM_KEY] != obj[CHECKSUM_KEY]:
        raise IntegrityError(f"{path} is corrupt (its content does not match its checksum). {rerun}")
    return obj


# --- sets of files published together -----------------------------------------------------------

def publish_set(parent: str | os.PathLike, set_id: str, write: Callable[[Path], None], pointer: str | os.PathLike,
                manifest: dict[str, Any] | None = None, before_pointer: Callable[[], None] | None = None) -> Path:
    """Write a set of files with `write(folder)`, seal their checksums, and make it current.

    The folder is `parent/<set_id>.partial` while written, `parent/<set_id>` once complete; `pointer`
    (a text file holding set_id) is replaced last, right after `before_pointer()` where given (for
    files outside the set that must not outlive the set they were made with). Returns the final folder.
    """
    parent = Path(parent)
    final = parent / set_id
    partial = parent / f"{set_id}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    (partial / "owner.pid").write_text(str(os.getpid()))
    write(partial)
    (partial / "owner.pid").unlink()
    files = {p.name: sha256_file(p) for p in sorted(partial.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_sealed_json(partial / MANIFEST, {**(manifest or {}), "set_id": set_id, "files": files})
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    if before_pointer is not None:
        before_pointer()
    write_text(pointer, set_id + "\n")
    return final


def open_set(parent: str | os.PathLike, pointer: str | os.PathLike, rerun: str, verify: bool = True
             ) -> tuple[Path, dict[str, Any]]:
    """(folder, manifest) of the set that `pointer` names, every file checked against the manifest."""
    pointer = Path(pointer)
    if not pointer.exists():
        raise IntegrityError(f"{pointer} does not exist. {rerun}")
    set_id = pointer.read_text().strip()
    folder = Path(parent) / set_id
    if not set_id or not folder.is_dir():
        raise IntegrityError(f"{pointer} names {set_id!r}, which is not in {parent}. {rerun}")
    manifest = read_sealed_json(folder / MANIFEST, rerun)
    if verify:
        for name, digest in manifest["files"].items():
            verify_file(folder / name, digest, rerun)
    return folder, manifest


def clean_stale_partials(parent: str | os.PathLike) -> list[Path]:
    """Remove `*.partial` folders left by a killed writer (whose process no longer runs); say so."""
    removed = []
    for folder in sorted(Path(parent).glob("*.partial")) if Path(parent).is_dir() else []:
        owner = folder / "owner.pid"
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            pid = None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue  # another stage is writing it now
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        print(f"removed {folder}, left unfinished by an interrupted run")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
