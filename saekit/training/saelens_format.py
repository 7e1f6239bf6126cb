"""SAEs in SAELens's on-disk format: a folder holding `cfg.json` and `sae_weights.safetensors`.

Stage 02 writes its SAE this way too (next to topk_sae.pt), so that `sae_lens.SAE.load_from_disk`
loads it and reconstructs exactly as this project does; stages 03-05 read such a folder through
`load_saelens` (setting SAE_PATH), so an SAE trained with SAELens, or a pretrained one downloaded
by hand, can be analysed here. Only JSON and safetensors are read or written: loading runs no code.

SAELens 6 conventions this module relies on (sae_lens/saes/topk_sae.py, sae.py):
- W_enc is stored [d_in, d_sae], the transpose of this project's [n_latents, d_in]; W_dec, b_enc
  and b_dec have this project's shapes.
- encode = ReLU(TopK(W_enc^T (x - b_dec) + b_enc)) when `apply_b_dec_to_input`, the same as
  TopKSAE.encode; decode = codes @ W_dec + b_dec.
- `rescale_acts_by_decoder_norm` multiplies the pre-activations by each decoder row's norm before
  the TopK and divides the codes by it before decoding: equivalent to scaling encoder rows up and
  decoder rows down by that norm, which `load_saelens` folds into the weights.
- A BatchTopK SAE is saved for inference as a JumpReLU SAE (sae_lens/saes/batchtopk_sae.py):
  architecture "jumprelu", with a `threshold` per latent; encode = ReLU(pre) where pre > threshold.
  JumpReLU SAEs load here as BatchTopKSAE (k from the metadata where this project wrote it).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..base.errors import PipelineError
from ..base.integrity import sha256_file
from .sae import BatchTopKSAE, TopKSAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# the config layout written here is SAELens 6's; an older version number would make SAELens
# convert the file as a pre-6 config
SAELENS_CONFIG_VERSION = "6.0.0"


class SAELensFormatError(PipelineError):
    pass


def is_saelens_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def save_saelens(sae: TopKSAE, folder: str | Path, model_name: str, hook_name: str,
                 metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` as SAELens reads it (TopK; BatchTopK as JumpReLU) into `folder`, replacing what was
    there as one step.

    `metadata` (JSON values: run id, settings, ...) goes into cfg.json's "metadata" beside
    model_name and hook_name; SAELens keeps it and ignores what it does not know.
    """
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    weights = {"W_enc": sae.W_enc.detach().T, "b_enc": sae.b_enc.detach(),
               "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}
    cfg = {"architecture": "topk", "d_in": sae.d_in, "d_sae": sae.n_latents, "k": sae.k,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "rescale_acts_by_decoder_norm": False, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAELENS_CONFIG_VERSION, "model_name": model_name,
                        "hook_name": hook_name, **(metadata or {})}}
    if isinstance(sae, BatchTopKSAE):  # inference is a JumpReLU, as SAELens saves its own BatchTopK SAEs
        weights["threshold"] = sae.threshold.detach()
        cfg["architecture"] = "jumprelu"
        cfg["metadata"].update(trained_architecture=sae.architecture, k=sae.k)
        del cfg["k"], cfg["rescale_acts_by_decoder_norm"]
    save_file({name: w.float().cpu().contiguous() for name, w in weights.items()}, str(partial / WEIGHTS_FILE))
    (partial / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    # swap the folders so a reader sees the old pair or the new pair, never one file of each
    old = folder.with_name(folder.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        folder.rename(old)
    partial.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def load_saelens(folder: str | Path, device: str | torch.device = "cpu") -> tuple[TopKSAE, dict[str, Any]]:
    """(sae, cfg) from a SAELens folder holding a TopK or JumpReLU SAE; cfg is cfg.json as a dict.

    The SAE behaves exactly as SAELens's TopKSAE or JumpReLUSAE with that config, on raw activations.
    """
    folder = Path(folder)
    if not is_saelens_folder(folder):
        raise SAELensFormatError(f"{folder} is not an SAE in SAELens's format (it needs {CFG_FILE} and "
                                 f"{WEIGHTS_FILE}). Set SAE_PATH to such a folder, or to '' for stage 02's SAE.")
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise SAELensFormatError(f"{folder / CFG_FILE} cannot be read as JSON: {err}") from None
    _check_cfg_types(cfg, folder / CFG_FILE)
    architecture = cfg.get("architecture") or ("topk" if cfg.get("activation_fn") == "topk" else "standard")
    if architecture not in ("topk", "jumprelu"):
        raise SAELensFormatError(f"{folder} holds a {architecture!r} SAE; stages 03-05 analyse TopK and JumpReLU "
                                 "(BatchTopK) SAEs only (architecture 'topk' or 'jumprelu' in cfg.json)")
    normalize = cfg.get("normalize_activations", "none")
    if normalize != "none":
        raise SAELensFormatError(f"{folder} normalises its inputs at run time ({normalize!r}), which needs "
                                 "statistics the folder does not hold; only 'none' is supported")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or (cfg.get("metadata") or {}).get("k")
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            weights = {name: f.get_tensor(name).float() for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        raise SAELensFormatError(f"{folder / WEIGHTS_FILE} is not a readable safetensors file: {err}") from None
    missing = ({"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if architecture == "jumprelu" else set())) - set(weights)
    if missing:
        raise SAELensFormatError(f"{folder / WEIGHTS_FILE} lacks {', '.join(sorted(missing))}")

    W_enc, b_enc, W_dec, b_dec = (weights[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    d_in, d_sae = W_enc.shape
    if W_dec.shape != (d_sae, d_in) or b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
        raise SAELensFormatError(f"{folder}: weight shapes W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}, "
                                 f"b_enc {tuple(b_enc.shape)}, b_dec {tuple(b_dec.shape)} do not fit together")
    if architecture == "jumprelu" and weights["threshold"].shape != (d_sae,):
        raise SAELensFormatError(f"{folder}: threshold has shape {tuple(weights['threshold'].shape)}, not ({d_sae},)")
    _check_weights(cfg, weights, folder)
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):  # a TopK option only
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        # x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc): the same codes from centred inputs
        b_enc = b_enc + b_dec @ W_enc
    try:  # the SAE's own rule for k: required by TopK, optional for a JumpReLU
        sae = (TopKSAE if architecture == "topk" else BatchTopKSAE)(d_in, d_sae, k)
    except ValueError:
        raise SAELensFormatError(f"{folder / CFG_FILE}: k must be an integer in 1..{d_sae}, got {k!r}") from None
    with torch.no_grad():
        if architecture == "jumprelu":
            sae.threshold.copy_(weights["threshold"])
        sae.W_enc.copy_(W_enc.T)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
    return sae.to(device).eval(), cfg


# cfg.json keys whose value, where present, must have this type; SAELens writes more, read nowhere here
_CFG_TYPES: dict[str, tuple[type, ...]] = {
    "architecture": (str,), "activation_fn": (str,), "normalize_activations": (str,),
    "d_in": (int,), "d_sae": (int,), "apply_b_dec_to_input": (bool,), "rescale_acts_by_decoder_norm": (bool,),
    "activation_fn_kwargs": (dict,), "metadata": (dict,)}


def _check_cfg_types(cfg: Any, path: Path) -> None:
    """A cfg.json that is a JSON object whose known keys have SAELens's types; anything else (a list,
    null, a metadata that is a string) would fail later, far from its cause."""
    if not isinstance(cfg, dict):
        raise SAELensFormatError(f"{path} holds a JSON {type(cfg).__name__}, not an object of settings "
                                 "(architecture, d_in, d_sae, ...): it is not a SAELens config")
    for key, types in _CFG_TYPES.items():
        value = cfg.get(key)
        # JSON true is a Python int too: only a key that wants a bool may hold one
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise SAELensFormatError(f"{path}: {key} must be a {types[0].__name__}, got {_short(value)} "
                                     f"({type(value).__name__}): it is not a SAELens config this project can read")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_weights(cfg: dict[str, Any], weights: dict[str, torch.Tensor], folder: Path) -> None:
    """Refuse weights that contradict cfg.json, hold a non-finite value, or have a latent that cannot
    write anything: each would give codes or a verdict computed from nonsense, with no word why."""
    d_in, d_sae = weights["W_enc"].shape
    for key, actual in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and cfg[key] != actual:
            raise SAELensFormatError(f"{folder / CFG_FILE} says {key} = {cfg[key]} but {WEIGHTS_FILE} has {actual}: "
                                     "the config and the weights do not belong together")
    for name, tensor in weights.items():
        bad = (~torch.isfinite(tensor)).sum().item()
        if bad:
            raise SAELensFormatError(f"{folder / WEIGHTS_FILE}: {name} has {bad} non-finite value(s) (NaN or inf) "
                                     f"of {tensor.numel()}: the SAE is broken; export it again")
    # A zero row cannot write anything, and SAELens's decoder-norm rescaling would divide by it: the
    # decoder geometry, the logit lens and steering need a direction for every latent, so refuse.
    zero = (weights["W_dec"] == 0).all(dim=1).nonzero().flatten()
    if len(zero):
        raise SAELensFormatError(f"{folder / WEIGHTS_FILE}: {len(zero)} of {d_sae} latents have an all-zero decoder "
                                 f"row (first: latent {int(zero[0])}), so they cannot write anything; give every "
                                 "latent a decoder direction, or drop those latents from the SAE")


def load_sae(settings, device: str | torch.device = "cpu") -> tuple[TopKSAE, dict[str, Any]]:
    """The SAE that stages 03-05 analyse, with its metadata: SAE_PATH's SAELens folder when set,
    else stage 02's store/sae_model/topk_sae.pt.

    The metadata always holds sae_id, model_id, layer_signature and source. A folder written by
    stage 02 names its model and layer; one from elsewhere (a SAELens hook name such as
    blocks.8.hook_resid_pre means nothing to this project) is taken to be for MODEL_ID and
    LAYER_SIGNATURE as set, which the caller checks against its width.
    """
    if not settings.SAE_PATH:
        sae, meta = TopKSAE.load(settings.store / "sae_model" / "topk_sae.pt", device)
        return sae, {**meta, "source": "stage 02"}
    folder = Path(settings.SAE_PATH)
    sae, cfg = load_saelens(folder, device)
    written_here = cfg.get("metadata") or {}
    return sae, {"sae_id": sha256_file(folder / WEIGHTS_FILE)[:16], "source": str(folder),
                 "model_id": written_here.get("model_id", settings.MODEL_ID),
                 "layer_signature": written_here.get("layer_signature", settings.LAYER_SIGNATURE),
                 "saelens_metadata": written_here}
