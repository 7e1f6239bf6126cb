"""What every stage does first: read the settings, say them, and keep a copy beside its artifacts."""
from __future__ import annotations

import os
import sys

import torch

from ..base.atomic import write_json
from ..base.distributed import World, barrier, init_world, process_device
from ..base.errors import print_user_errors, show_user_errors_in_notebook
from ..base.settings import Settings, check_flags, flags, load_settings
from .models import detect_device, load_model, model_dtype


def start_stage(name: str, args: list[str] | None = None,
                allowed_flags: set[str] = frozenset()) -> tuple[Settings, set[str]]:
    """Effective settings for a stage, printed, and the bare --flags it was given.

    Scripts pass sys.argv[1:]; notebooks pass nothing, and the overrides come from SAE_ARGS.
    """
    if args is not None:
        sys.excepthook = print_user_errors
        if {"--help", "-h"} & set(args):
            print_help(allowed_flags)
            sys.exit(0)
        check_flags(args, set(allowed_flags))
    else:
        show_user_errors_in_notebook()
    settings = load_settings(args)
    torch.manual_seed(settings.SEED)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process speaks for all
        print(f"== {name} == preset {settings.PRESET!r}; effective settings:\n{settings.describe()}\n")
    return settings, flags(args or [])


def print_help(allowed_flags: set[str] = frozenset()) -> None:
    """The running script's own docstring (its usage), then how settings and flags are given."""
    usage = (sys.modules["__main__"].__doc__ or "").strip()
    flags_text = ", ".join(f"--{f}" for f in sorted(allowed_flags)) or "none"
    print(f"{usage}\n\nSettings: --KEY=value for any name in config.py (its comments say what each does), "
          f"or --preset=NAME; docs/settings.md lists them all. Flags: {flags_text}.")


def stage_runtime(settings: Settings) -> tuple[torch.device, World]:
    """This process's device and its place among torchrun's processes (a world of one without it)."""
    device = process_device(detect_device(settings.DEVICE))
    return device, init_world(device)


def load_stage_model(settings: Settings, device: torch.device, world: World, model_id: str | None = None):
    """(model, tokenizer) in MODEL_DTYPE; rank 0 loads first, since it may write the embedded model's
    cache, and the other ranks then read that cache."""
    if not world.is_main:
        barrier(world)
    loaded = load_model(model_id or settings.MODEL_ID, device, cache_dir=settings.store / "models",
                        dtype=model_dtype(settings.MODEL_DTYPE, device))
    if world.is_main:
        barrier(world)
    return loaded


def record_settings(settings: Settings, stage: str) -> None:
    """store/settings/<stage>.json: the settings that made the stage's artifacts."""
    write_json(settings.store / "settings" / f"{stage}.json", settings.as_dict())
