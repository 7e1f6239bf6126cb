"""`make clean-store`: remove the unfinished `.partial` folders a killed stage left in the store, and
nothing else: the runs, the SAE and the concept sets stay.

    python -m saekit.base.cleanup [--STORE_DIR=path] [--KEY=value ...]

The store is STORE_DIR as the stages read it (config.py, a preset, the command line). A `.partial`
folder whose writer still runs (its owner.pid names a live process) is kept.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import print_user_errors
from .integrity import clean_stale_partials
from .settings import check_flags, load_settings


def clean_store(store: Path) -> list[Path]:
    """Remove every stale `*.partial` folder under `store` (at any depth); return those removed."""
    if not store.is_dir():
        return []
    parents = {folder.parent for folder in store.rglob("*.partial") if folder.is_dir()}
    removed = []
    for parent in sorted(parents):
        removed += clean_stale_partials(parent)
    return removed


def main(args: list[str]) -> None:
    sys.excepthook = print_user_errors
    check_flags(args, set())
    store = load_settings(args).store
    removed = clean_store(store)
    print(f"{store}: {len(removed)} unfinished folder(s) removed; runs, SAE and concepts kept")


if __name__ == "__main__":
    main(sys.argv[1:])
