"""Read config.py, apply a preset and command-line overrides, and check every value.

nanoGPT style: the settings are config.py's UPPER_CASE constants; `--KEY=value` overrides one for
a run. Values are parsed as Python literals, so `--LR=3e-4` is a float and `--DEVICE=cpu` a string.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .errors import PipelineError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_VAR = "SAE_ARGS"


class SettingsError(PipelineError, ValueError):
    """A preset or override that config.py does not accept."""


class Settings(SimpleNamespace):
    """The effective settings of one run; attribute access, plus a dict for artifacts."""

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @property
    def store(self) -> Path:
        path = Path(self.STORE_DIR)
        return path if path.is_absolute() else PROJECT_ROOT / path

    def describe(self) -> str:
        width = max(len(k) for k in vars(self))
        return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in vars(self).items())


def _constants(module_path: Path) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location(f"_sae_config_{module_path.stem}", module_path)
    if spec is None or spec.loader is None:
        raise SettingsError(f"cannot read settings from {module_path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {k: v for k, v in vars(module).items() if k.isupper()}


def _parse(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word such as cpu or embedded is a string


def _coerce(key: str, value: Any, default: Any, valid: list[str]) -> Any:
    expected = type(default)
    if default is None or isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise SettingsError(
        f"{key} must be a {expected.__name__} (its default is {default!r}), got {value!r} "
        f"({type(value).__name__}).\nValid keys: {', '.join(valid)}"
    )


def _apply(values: dict[str, Any], overrides: dict[str, Any], source: str) -> None:
    valid = sorted(k for k in values if k not in ("PRESETS", "PRESET"))
    for key, value in overrides.items():
        if key not in values or key == "PRESETS":
            raise SettingsError(
                f"unknown setting {key!r} in {source}.\nValid keys: {', '.join(valid)}"
            )
        values[key] = _coerce(key, value, values[key], valid)


def _preset_overrides(name: str, presets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if name.endswith(".py"):
        path = Path(name)
        if not path.exists():
            raise SettingsError(f"preset file {name} does not exist")
        return _constants(path)
    if name not in presets:
        raise SettingsError(
            f"unknown preset {name!r}. Presets: {', '.join(presets)}, or a path to a .py file "
            "of UPPER_CASE constants"
        )
    return presets[name]


def load_settings(args: list[str] | None = None, config_path: str | os.PathLike | None = None) -> Settings:
    """Effective settings: config.py, then its preset, then `--KEY=value` overrides.

    `args` defaults to the SAE_ARGS environment variable (how notebooks receive overrides);
    scripts pass sys.argv[1:]. Flags without `=` (such as --resume) are left for the script.
    """
    if args is None:
        args = shlex.split(os.environ.get(ENV_VAR, ""))
    values = _constants(Path(config_path) if config_path else PROJECT_ROOT / "config.py")
    values.setdefault("STORE_DIR", "store")
    presets = values.get("PRESETS", {})

    overrides: dict[str, Any] = {}
    preset = values.get("PRESET", "local")
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            continue
        key, raw = arg[2:].split("=", 1)
        if key.lower() == "preset":
            preset = raw
        else:
            overrides[key] = _parse(raw)

    _apply(values, _preset_overrides(preset, presets), f"preset {preset!r}")
    _apply(values, overrides, "the command line")
    values["PRESET"] = preset
    values.pop("PRESETS", None)
    return Settings(**values)


def flags(args: list[str]) -> set[str]:
    """The bare `--flag` arguments (no `=`), e.g. {'resume'}."""
    return {a[2:] for a in args if a.startswith("--") and "=" not in a}


def check_flags(args: list[str], allowed: set[str]) -> None:
    unknown = flags(args) - allowed
    bare = [a for a in args if not a.startswith("--")]
    if unknown or bare:
        bad = sorted(unknown) + bare
        allowed_text = ", ".join(f"--{f}" for f in sorted(allowed)) or "none"
        sys.exit(
            f"error: unknown argument(s) {bad}. Settings are given as --KEY=value "
            f"(see config.py) or --preset=NAME; flags this script takes: {allowed_text}"
        )
