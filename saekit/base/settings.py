"""Read config.py, apply a preset and command-line overrides, and check every value.

nanoGPT style: the settings are config.py's UPPER_CASE constants; `--KEY=value` overrides one for
a run. Values are parsed as Python literals, so `--LR=3e-4` is a float and `--DEVICE=cpu` a string.
A preset file is read as data: its UPPER_CASE literal assignments, never executed.
Every value is checked against RULES (type and range) before any stage writes anything.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import os
import re
import shlex
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from .errors import PipelineError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
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

    @property
    def target(self) -> str | None:
        """The signature of the module whose output a transcoder predicts; None when TRAIN_TARGET is "sae"."""
        return transcoder_target(self.TRAIN_TARGET, self.LAYER_SIGNATURE, self.TARGET_SIGNATURE, self.ALLOW_ANY_TARGET)

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
    if expected is float and isinstance(value, str) and value.lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(value)  # a float after all, which the range check then refuses
    raise SettingsError(
        f"{key} must be a {expected.__name__} (its default is {default!r}), got {value!r} "
        f"({type(value).__name__}). Valid keys: {', '.join(valid)}"
    )


def _apply(values: dict[str, Any], overrides: dict[str, Any], source: str) -> None:
    valid = sorted(k for k in values if k not in ("PRESETS", "PRESET"))
    for key, value in overrides.items():
        if key not in values or key == "PRESETS":
            raise SettingsError(
                f"unknown setting {key!r} in {source}. Valid keys: {', '.join(valid)}"
            )
        values[key] = _coerce(key, value, values[key], valid)


def _preset_file(path: Path) -> dict[str, Any]:
    """UPPER_CASE = literal assignments of a preset file, parsed, never run: a preset received from
    someone else cannot execute code."""
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError, ValueError) as err:
        raise SettingsError(f"cannot read preset file {path}: {err}") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if not isinstance(target, ast.Name) or not target.id.isupper():
            raise SettingsError(f"{path}:{node.lineno}: a preset file holds only UPPER_CASE = value lines "
                                "(it is read as data, not run)")
        try:
            values[target.id] = ast.literal_eval(node.value)
        except ValueError:
            raise SettingsError(f"{path}:{node.lineno}: {target.id} must be a literal (a number, string, "
                                "list, ...); preset files are read as data, not run") from None
    return values


# Settings that may name a file or folder. One rule for all: a relative path is read from the project
# folder (where config.py is), whatever the working folder, as STORE_DIR's default "store" always was.
PATH_SETTINGS = ("STORE_DIR", "MODEL_ID", "HF_DATASET", "EVAL_DATASET", "SAE_PATH", "NAMING_MODEL_ID")
NOT_PATHS = ("", "embedded", "none")  # the settings' own words, never files


def resolve_path(key: str, value: str) -> str:
    """`value` as the stages read it: an absolute path stays; a relative one that exists in the project
    folder becomes that path; anything else (a hub id, an endpoint, a folder still to be made) stays as
    given, except a relative path that exists only in the working folder, which is refused rather than
    read from a folder the rule does not name."""
    if value in NOT_PATHS or "://" in value or Path(value).is_absolute():
        return value
    in_project = PROJECT_ROOT / value
    if in_project.exists():
        return str(in_project)
    if Path(value).exists() and Path.cwd().resolve() != PROJECT_ROOT:
        raise SettingsError(f"{key}={value!r} is a relative path, and relative paths are read from the project "
                            f"folder {PROJECT_ROOT}, where it does not exist; it exists in the working folder: "
                            f"give its absolute path, {key}={str(Path(value).resolve())!r}")
    # the store is a folder the stages make, never a hub id: on a fresh clone it does not exist yet, and it
    # must still name the project's folder, not whichever folder a stage happens to be started from
    return str(in_project) if key == "STORE_DIR" and value.strip() else value


def _preset_overrides(name: str, presets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if name.endswith(".py"):
        path = Path(resolve_path("PRESET", name))
        if not path.exists():
            raise SettingsError(f"preset file {name} does not exist")
        return _preset_file(path)
    if name not in presets:
        raise SettingsError(
            f"unknown preset {name!r}. Presets: {', '.join(presets)}, or a path to a .py file "
            "of UPPER_CASE = literal lines"
        )
    return presets[name]


# --- ranges --------------------------------------------------------------------------------------
# Each rule returns None for a good value or says what a good value is.

def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"at least {low}"


def _between(low: float, high: float, open_low: bool = False, open_high: bool = False) -> Callable[[Any], str | None]:
    def rule(v):
        ok = (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
        return None if ok else f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return rule


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"one of {', '.join(map(repr, choices))}"


def _not_empty(v: str) -> str | None:
    return None if v.strip() else "not empty"


def _any(v: Any) -> None:
    return None


def _device(v: str) -> str | None:
    import torch

    if v in ("auto", "cpu"):
        return None
    if v == "mps":
        mps = getattr(torch.backends, "mps", None)
        return None if mps is not None and mps.is_available() else "auto or cpu (this machine has no mps device)"
    if v == "cuda" or v.startswith("cuda:") and v[5:].isdigit():
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(v[5:]) if ":" in v else 0
        if index < count:
            return None
        return (f"a device that exists here: auto, cpu or cuda:0..cuda:{count - 1}" if count
                else "auto or cpu (this machine has no CUDA device)")
    return "auto, cpu, cuda, cuda:N or mps"


def _label_field(v: str) -> str | None:
    if v == v.strip() and "," not in v:
        return None
    return "'' (automatic), 'none' or one field name, without spaces around it or commas"


def _store_dir(v: str) -> str | None:
    if not v.strip():
        return "not empty"
    path = Path(v) if Path(v).is_absolute() else PROJECT_ROOT / v
    for folder in (path, *path.parents):  # the first part that exists must be a folder, or nothing can go in
        if folder.exists():
            return None if folder.is_dir() else f"a folder, but {folder} is a file"
    return None


def _neuronpedia_id(v: str) -> str | None:
    """Neuronpedia's ids are lower case (its upload route refuses others) and sit in URLs and S3 paths."""
    return None if v == "" or re.fullmatch(r"[a-z0-9][a-z0-9._-]*", v) else \
        "'' (the default) or lower-case letters, digits, '.', '_' and '-', starting with a letter or digit"


def _source_set_name(v: str) -> str | None:
    """What Neuronpedia's /api/source-set/new accepts as a name."""
    ok = v == "" or re.fullmatch(r"[a-z][a-z0-9-]*[a-z0-9]|[a-z0-9]", v) and "--" not in v and v != "neurons"
    return None if ok else ("'' (the default) or a name Neuronpedia takes: lower-case letters, digits and single "
                            "hyphens, starting with a letter, not ending with a hyphen, not 'neurons'")


TOKEN_ROLES = ("bos", "eos", "pad")


def _token_list(v: list) -> str | None:
    ok = all(item in TOKEN_ROLES or isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in v)
    return None if ok else f"a list of {', '.join(map(repr, TOKEN_ROLES))} and token ids (integers >= 0)"


def _sae_path(v: str) -> str | None:
    if not v or ((Path(v) / "cfg.json").is_file() and (Path(v) / "sae_weights.safetensors").is_file()):
        return None
    return "'' (stage 02's SAE) or a folder holding cfg.json and sae_weights.safetensors (SAELens's format)"


def _fractions_summing_below_one(v: Any) -> str | None:
    ok = (isinstance(v, (tuple, list)) and all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1
                                               for f in v) and sum(v) < 1)
    return None if ok else "a tuple of fractions in (0, 1) summing to less than 1 (the last group takes the rest)"


# --- SWEEP: several SAEs trained on the same batches (saekit.training.sweep) ------------------------
SWEEP_KEYS = ("TOP_K", "N_LATENTS_MULTIPLIER", "ARCHITECTURE", "LR")  # what a variant may set; the rest is shared
SWEEP_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # a folder name on every system, and in Neuronpedia's ids


def sweep_variant(entry: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """One SWEEP entry's settings: the shared ones (`values`) with the entry's keys over them."""
    return {**{key: values[key] for key in SWEEP_KEYS}, **{k: v for k, v in entry.items() if k != "name"}}


def sweep_name(entry: dict[str, Any], values: dict[str, Any]) -> str:
    """The entry's "name", or one made of what it trains: topk-k16-x4 (and -lr0.002 where LR is set)."""
    if "name" in entry:
        return entry["name"]
    v = sweep_variant(entry, values)
    return f"{v['ARCHITECTURE']}-k{v['TOP_K']}-x{v['N_LATENTS_MULTIPLIER']}" + (f"-lr{v['LR']:g}" if v["LR"] else "")


def sweep_problems(values: dict[str, Any]) -> list[str]:
    """What is wrong with SWEEP and SWEEP_CHOICE, each entry named by its position; [] when nothing is.

    An entry is a dict of SWEEP_KEYS (each checked by its own setting's rule) and an optional "name"; the
    widths are checked against d_model by stage 02, which knows it, before anything is written."""
    sweep, problems = values.get("SWEEP", []), []
    names: list[str] = []
    for i, entry in enumerate(sweep):
        where = f"SWEEP[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}={entry!r} must be a dict such as {{'TOP_K': 16}}")
            continue
        unknown = sorted(set(entry) - {*SWEEP_KEYS, "name"}, key=str)
        if unknown:
            problems.append(f"{where} has unknown key(s) {unknown}: a variant sets {', '.join(SWEEP_KEYS)} and "
                            "optionally 'name'")
            continue
        for key, value in entry.items():
            if key == "name":
                if not isinstance(value, str) or not SWEEP_NAME.fullmatch(value):
                    problems.append(f"{where}'s name {value!r} must be lower-case letters, digits, '.', '_' and '-', "
                                    "starting with a letter or digit, at most 64 characters")
                continue
            try:
                value = _coerce(key, value, values[key], list(SWEEP_KEYS))
            except SettingsError:
                problems.append(f"{where}'s {key}={value!r} must be a {type(values[key]).__name__}")
                continue
            if (wrong := RULES[key](value)) is not None:
                problems.append(f"{where}'s {key}={value!r} must be {wrong}")
        names.append(sweep_name(entry, values) if isinstance(entry.get("name", ""), str) else "")
    if problems:
        return problems
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"SWEEP trains {', '.join(map(repr, repeated))} more than once: give each variant other "
                        "settings or its own 'name'")
    if len(sweep) == 1:
        problems.append("SWEEP has one variant: set its values as the settings themselves (SWEEP=[] trains one SAE), "
                        "or list at least two")
    choice = values.get("SWEEP_CHOICE", "")
    if choice and choice not in names:
        problems.append(f"SWEEP_CHOICE={choice!r} must be '' (stage 03's rule) or one of SWEEP's names: "
                        f"{', '.join(names) or 'SWEEP is empty'}")
    if sweep and values.get("SAE_PATH"):
        problems.append("SAE_PATH and SWEEP are both set: SAE_PATH analyses one SAE from elsewhere; set SAE_PATH='' "
                        "to analyse the sweep, or SWEEP=[]")
    return problems

# A Llama-style block's MLP input and output, by signature (mi_crow's names: saekit.activations.models).
# Listed by name, not found by tracing: this rule is checked with the settings, before any model loads.
MLP_INPUT = re.compile(r"(?P<block>.+_layers_\d+)_post_attention_layernorm")
MLP_OUTPUT_SUFFIX = "_mlp"


def transcoder_target(train_target: str, layer: str, target: str, allow_any: bool) -> str | None:
    """TRAIN_TARGET's target module: None for an SAE; for a transcoder TARGET_SIGNATURE, by default the
    MLP of LAYER_SIGNATURE's block. A pair that is not one MLP's input and output is refused unless
    ALLOW_ANY_TARGET, since the splice of stage 03 then replaces something other than an MLP."""
    if train_target == "sae":
        if target:
            raise SettingsError(f"TARGET_SIGNATURE={target!r} is set but TRAIN_TARGET='sae' reconstructs "
                                "LAYER_SIGNATURE's own output: set TRAIN_TARGET='transcoder' (or 'skip_transcoder'), "
                                "or TARGET_SIGNATURE=''")
        return None
    block = MLP_INPUT.fullmatch(layer)
    mlp = block["block"] + MLP_OUTPUT_SUFFIX if block else None
    if not target:
        if mlp is None:
            raise SettingsError(f"TRAIN_TARGET={train_target!r} needs TARGET_SIGNATURE: LAYER_SIGNATURE={layer!r} is no "
                                "block's post_attention_layernorm, so it has no default MLP to predict. The pairs: "
                                "python 01_save_activations.py --list-layers")
        return mlp
    if target == layer:
        raise SettingsError(f"TARGET_SIGNATURE is LAYER_SIGNATURE ({layer!r}): a transcoder predicting its own input "
                            "is an SAE; set TRAIN_TARGET='sae'")
    if target != mlp and not allow_any:
        expected = f"the MLP of its block is {mlp!r}" if mlp else "it is no block's post_attention_layernorm"
        raise SettingsError(f"TARGET_SIGNATURE={target!r} and LAYER_SIGNATURE={layer!r} are not the output and input of "
                            f"one MLP ({expected}); set TARGET_SIGNATURE='' for the default, or ALLOW_ANY_TARGET=True to "
                            "train this pair anyway. The pairs: python 01_save_activations.py --list-layers")
    return target


RULES: dict[str, Callable[[Any], str | None]] = {
    "PRESET": _any,
    "MODEL_ID": _not_empty, "LAYER_SIGNATURE": _not_empty, "DEVICE": _device,
    "MODEL_DTYPE": _one_of("auto", "float32", "bfloat16", "float16"),
    "HF_DATASET": _not_empty, "EVAL_DATASET": _any, "DATA_SPLIT": _not_empty, "EVAL_SPLIT": _not_empty,
    "TEXT_FIELD": _not_empty, "EVAL_SHARE": _between(0, 1, open_low=True, open_high=True),
    "DATA_LIMIT": _at_least(0), "EVAL_DATA_LIMIT": _at_least(0), "MAX_LENGTH": _at_least(2),
    "BATCH_SIZE_SAVE": _at_least(1), "FORWARD_BATCH_TOKENS": _at_least(0), "ACTIVATION_DTYPE": _one_of("float16", "float32"),
    "SHARD_TOKENS": _at_least(1),
    "ARCHITECTURE": _one_of("topk", "batchtopk", "matryoshka"),
    "TRAIN_TARGET": _one_of("sae", "transcoder", "skip_transcoder"), "TARGET_SIGNATURE": _any,
    "ALLOW_ANY_TARGET": _one_of(True, False),
    "MATRYOSHKA_GROUP_FRACTIONS": _fractions_summing_below_one, "N_LATENTS_MULTIPLIER": _at_least(1), "TOP_K": _at_least(1), "EPOCHS": _at_least(1),
    "BATCH_SIZE_TRAIN": _at_least(2), "LR": _at_least(0), "LR_BASE": _between(0, 1, open_low=True),
    "WARMUP_STEPS": _at_least(0), "MIN_LR_FRACTION": _between(0, 1), "GRAD_CLIP": _between(0, math.inf, open_low=True),
    "AUXK_COEF": _at_least(0), "AUXK_K": _at_least(0), "DEAD_WINDOW_TOKENS": _at_least(0),
    "HELDOUT_FRACTION": _between(0, 1, open_low=True, open_high=True), "SHUFFLE_BUFFER_TOKENS": _at_least(1),
    "EXCLUDE_TOKENS": _token_list,
    "ACTIVATION_SOURCE": _one_of("store", "model"), "CHECKPOINT_SECONDS": _at_least(0),
    "SELECT_DTYPE": _one_of("auto", "float32", "bfloat16"),
    "KERNELS": _one_of("auto", "sparse", "dense"), "TF32": _one_of(True, False),
    "SWEEP": _any, "SWEEP_CHOICE": _any,  # checked together, by sweep_problems
    "SEED": _between(0, 2**64 - 1),  # what torch.manual_seed takes (numpy takes any size)
    "STORE_DIR": _store_dir, "SAE_PATH": _sae_path,
    "MAX_DEAD_FRACTION": _between(0, 1), "MAX_HELDOUT_FVU": _at_least(0), "MIN_CE_RECOVERED": _between(-math.inf, 1),
    "MAX_DELTA_CE": _at_least(0), "MIN_WEIGHT_CHANGE": _at_least(0), "CONTINUE_AFTER_FAIL": _one_of(True, False),
    "PROBE_LABEL_FIELD": _label_field, "PROBE_TEXTS": _at_least(10),
    "PROBE_MIN_POSITIVES": _at_least(3),  # the probe's 3-fold cross-validation needs a positive in every fold
    "PROBE_MIN_ACCURACY": _between(0.5, 1),
    "TOP_N_EXAMPLES": _at_least(1), "CONTEXT_TOKENS": _at_least(0), "QUANTILE_EXAMPLES": _at_least(0),
    "NON_ACTIVATING_EXAMPLES": _at_least(0), "N_LATENTS_TO_NAME": _at_least(-1), "NAMING_MODEL_ID": _any,
    "NAMING_MAX_NEW_TOKENS": _at_least(1), "NAMING_TIMEOUT_S": _between(0, 86400, open_low=True),
    "SCORING_EXAMPLES": _at_least(1), "LABEL_MAX_KEYS": _at_least(1), "LABEL_MIN_F1": _between(0, 1),
    "LABEL_MIN_SUPPORT": _at_least(1), "OUTPUT_EFFECT_LATENTS": _at_least(0), "OUTPUT_EFFECT_TEXTS": _at_least(1),
    "NAMING_API_MODEL": _any, "NAMING_API_KEY_ENV": _not_empty, "NAME_MIN_SCORE": _between(0.5, 1),
    "NEURONPEDIA_MODEL_ID": _neuronpedia_id, "NEURONPEDIA_SOURCE_SET": _source_set_name,
    "NEURONPEDIA_RELEASE": _neuronpedia_id, "NEURONPEDIA_HOOK_POINT": _any, "NEURONPEDIA_CREATOR_ID": _not_empty,
    "NEURONPEDIA_CREATOR_NAME": _not_empty,
}


def check_values(values: dict[str, Any]) -> None:
    """Every setting within its range, or one error listing each one that is not."""
    problems = []
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key}={value!r} must be a finite number")
            continue
        rule = RULES.get(key)
        if rule is None:
            problems.append(f"{key} has no rule in saekit.base.settings.RULES (add one saying its valid range)")
        elif (wrong := rule(value)) is not None:
            problems.append(f"{key}={value!r} must be {wrong}")
    if not problems:
        problems = sweep_problems(values)
    if problems:
        raise SettingsError("; ".join(problems))


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
    for key in PATH_SETTINGS:
        if isinstance(values.get(key), str):
            values[key] = resolve_path(key, values[key])
    values["PRESET"] = preset
    values.pop("PRESETS", None)
    check_values(values)
    settings = Settings(**values)
    settings.target  # a transcoder's pair is refused here, with the other settings, before a stage writes anything
    return settings


def flags(args: list[str]) -> set[str]:
    """The bare `--flag` arguments (no `=`), e.g. {'resume'}."""
    return {a[2:] for a in args if a.startswith("--") and "=" not in a}


def check_flags(args: list[str], allowed: set[str]) -> None:
    """Refuse bare words and --flags the caller does not take: `--TOPK 16` would otherwise be ignored."""
    unknown = flags(args) - allowed
    bare = [a for a in args if not a.startswith("--")]
    if unknown or bare:
        bad = sorted(unknown) + bare
        allowed_text = ", ".join(f"--{f}" for f in sorted(allowed)) or "none"
        raise SettingsError(
            f"unknown argument(s) {bad}. Settings are given as --KEY=value "
            f"(see config.py) or --preset=NAME; flags this script takes: {allowed_text}"
        )
