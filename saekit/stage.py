"""What every stage does first: read the settings, say them, and keep a copy beside its artifacts."""
from __future__ import annotations

import sys

import torch

from .atomic import write_json
from .errors import print_user_errors, show_user_errors_in_notebook
from .settings import Settings, check_flags, flags, load_settings


def start_stage(name: str, args: list[str] | None = None,
                allowed_flags: set[str] = frozenset()) -> tuple[Settings, set[str]]:
    """Effective settings for a stage, printed, and the bare --flags it was given.

    Scripts pass sys.argv[1:]; notebooks pass nothing, and the overrides come from SAE_ARGS.
    """
    if args is not None:
        sys.excepthook = print_user_errors
        check_flags(args, set(allowed_flags))
    else:
        show_user_errors_in_notebook()
    settings = load_settings(args)
    torch.manual_seed(settings.SEED)
    print(f"== {name} == preset {settings.PRESET!r}; effective settings:\n{settings.describe()}\n")
    return settings, flags(args or [])


def record_settings(settings: Settings, stage: str) -> None:
    """store/settings/<stage>.json: the settings that made the stage's artifacts."""
    write_json(settings.store / "settings" / f"{stage}.json", settings.as_dict())
