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
- Transcoders (sae_lens/saes/transcoder.py): no b_dec subtracted from the input (apply_b_dec_to_input
  must be false), W_dec [d_sae, d_out], b_dec [d_out]; the skip variants add x @ W_skip^T with W_skip
  [d_out, d_in]. SAELens 6 has ReLU and JumpReLU transcoders but no TopK one: a BatchTopK or Matryoshka
  transcoder is saved as "jumprelu_transcoder" / "jumprelu_skip_transcoder"; a TopK one cannot be.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..activations.models import public_model_id
from ..base.atomic import give_ordinary_permissions
from ..base.errors import PipelineError
from ..base.integrity import read_sealed_json, sha256_file, verify_file, write_sealed_json
from .sae import BatchTopKSAE, TopKSAE
from .sweep import chosen_name, sae_folder

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# the checksums of cfg.json and the weights, sealed: a folder this project wrote is checked when read back
# (SAELens ignores the file). A folder from elsewhere has none.
SEAL_FILE = "saekit_seal.json"
WRITTEN_BY = "saekit"
RESEAL = "Run stage 02 again (python 02_train_sae.py), or copy the folder again from where it was made."
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
    if sae.transcoder and not isinstance(sae, BatchTopKSAE):
        raise SAELensFormatError("a TopK transcoder has no SAELens format (SAELens 6 loads ReLU and JumpReLU "
                                 "transcoders only); train it with ARCHITECTURE='batchtopk' to get one")
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
    if sae.transcoder:
        cfg.update(architecture=f"jumprelu_{sae.kind}", d_out=sae.d_out, apply_b_dec_to_input=False)
        if sae.W_skip is not None:
            weights["W_skip"] = sae.W_skip.detach()
    cfg["metadata"]["written_by"] = WRITTEN_BY
    save_file({name: w.float().cpu().contiguous() for name, w in weights.items()}, str(partial / WEIGHTS_FILE))
    (partial / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    write_sealed_json(partial / SEAL_FILE, {"files": {name: sha256_file(partial / name)
                                                      for name in (CFG_FILE, WEIGHTS_FILE)}})
    for path in partial.iterdir():
        give_ordinary_permissions(path)  # safetensors writes 0600; a shared store's readers need 0644
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


def check_seal(folder: Path) -> bool:
    """True when `folder` carries this project's seal and every file matches it; False for a folder
    from elsewhere (no seal, and not marked as written here); an error when the files do not match the
    seal, or a folder this project wrote has lost its seal."""
    if (folder / SEAL_FILE).exists():
        seal = read_sealed_json(folder / SEAL_FILE, RESEAL)
        for name, digest in seal["files"].items():
            verify_file(folder / name, digest, RESEAL)
        return True
    try:
        written_by = (json.loads((folder / CFG_FILE).read_text()).get("metadata") or {}).get("written_by")
    except (OSError, ValueError, AttributeError):
        return False  # load_saelens names what is wrong with the config
    if written_by == WRITTEN_BY:
        raise SAELensFormatError(f"{folder} was written by this project's stage 02 but its {SEAL_FILE} is missing, "
                                 f"so its files cannot be checked. {RESEAL}")
    return False


# TransformerLens hook names (SAELens's for TransformerLens models) that equal a module output this
# project can hook: a block's output, its attention's and its MLP's outputs (docs/settings.md)
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_attn_out|hook_mlp_out)$")
_BLOCK = re.compile(r"^(?P<head>.*?_(?:layers|layer|h|blocks))_(?P<n>\d+)(?:_(?P<rest>.+))?$")
_ATTENTION = ("self_attn", "attn", "attention", "self_attention")


def saelens_hook_name(layer_signature: str, module_path: str | None = None) -> str:
    """SAELens's name for the layer: the TransformerLens hook where one equals the module's output
    (a block's output: blocks.N.hook_resid_post; its attention: hook_attn_out; its MLP: hook_mlp_out), else
    the transformers module path, which is how SAELens names a hook on a transformers model
    (model_class_name AutoModelForCausalLM). `module_path` is that path (stage 01 records it); without
    it, the signature stands in."""
    found = _BLOCK.match(layer_signature)
    if found:
        kind = {None: "hook_resid_post", "mlp": "hook_mlp_out",
                **{name: "hook_attn_out" for name in _ATTENTION}}.get(found["rest"])
        if kind:
            return f"blocks.{found['n']}.{kind}"
    return module_path or layer_signature


def _hook_layer(hook_name: str, layer_signature: str) -> tuple[bool, str]:
    """(whether `hook_name` names LAYER_SIGNATURE's layer, what to set instead where that can be said)."""
    if hook_name == layer_signature or "." in hook_name and layer_signature.endswith("_" + hook_name.replace(".", "_")):
        return True, ""
    tl, ours = _TL_HOOK.match(hook_name), _BLOCK.match(layer_signature)
    if tl is None and "." in hook_name and not hook_name.startswith(("blocks.", "hook_")):  # a module path
        model_class = layer_signature.split("_", 1)[0]
        return False, f"set --LAYER_SIGNATURE={model_class}_{hook_name.replace('.', '_')} and run stage 01 for it"
    if tl is None:
        return False, (f"it is not a hook this project can place (docs/settings.md); set hook_name in its {CFG_FILE} "
                       "to the layer's module path (as --list-layers shows it, dots for underscores) if you know it "
                       "reads that layer")
    block, kind = int(tl[1]), tl[2]
    if kind == "hook_resid_pre":  # the input of block N is the output of block N - 1
        block, kind = block - 1, "hook_resid_post"
    if ours is not None and block >= 0 and saelens_hook_name(layer_signature) == f"blocks.{block}.{kind}":
        return True, ""
    if ours is None or block < 0:
        return False, "set LAYER_SIGNATURE to the layer that hook reads (python 01_save_activations.py --list-layers)"
    rest = {"hook_resid_post": "", "hook_mlp_out": "_mlp", "hook_attn_out": "_self_attn"}[kind]
    return False, f"set --LAYER_SIGNATURE={ours['head']}_{block}{rest} (the layer that hook reads) and run stage 01 for it"


def _same_model(name: str, model_id: str) -> bool:
    """Whether SAELens's model_name names MODEL_ID's model: by its last part, ignoring case (SAELens's own
    pretrained SAEs say gemma-2-2b for google/gemma-2-2b)."""
    def last(value: str) -> str:
        return Path(value.rstrip("/")).name.lower()
    return last(name) in (last(model_id), last(public_model_id(model_id)))


def check_saelens_place(cfg: dict[str, Any], folder: Path, model_id: str, layer_signature: str) -> None:
    """Refuse an SAE from elsewhere whose cfg.json names another model or another layer than the settings:
    every layer of a model is often as wide, so the width check alone would analyse it at the wrong one."""
    metadata = cfg.get("metadata") or {}
    model_name, hook_name = (metadata.get(key, cfg.get(key)) for key in ("model_name", "hook_name"))
    if isinstance(model_name, str) and model_name and not _same_model(model_name, model_id):
        raise SAELensFormatError(f"the SAE in {folder} was trained on model {model_name!r} ({CFG_FILE}'s model_name) "
                                 f"but MODEL_ID is {model_id!r}: set MODEL_ID to {model_name!r}'s hub id or local "
                                 "folder (and run stage 01 for it), or SAE_PATH to an SAE of this model")
    if isinstance(hook_name, str) and hook_name:
        same, instead = _hook_layer(hook_name, layer_signature)
        if not same:
            raise SAELensFormatError(f"the SAE in {folder} reads hook {hook_name!r} ({CFG_FILE}'s hook_name), not "
                                     f"LAYER_SIGNATURE {layer_signature!r} ({saelens_hook_name(layer_signature)!r}): "
                                     f"{instead}, or set SAE_PATH to an SAE of this layer")


def load_sae(settings, device: str | torch.device = "cpu") -> tuple[TopKSAE, dict[str, Any]]:
    """The SAE that stages 03-05 analyse, with its metadata: SAE_PATH's SAELens folder when set,
    else stage 02's store/sae_model/topk_sae.pt (with SWEEP, the chosen SAE's store/sweep/<name>/topk_sae.pt).

    The metadata always holds sae_id, model_id, layer_signature, source and sealed. A folder written by
    stage 02 carries its seal, checked here, and names its model and layer; one from elsewhere has no
    seal, and its cfg.json's model_name and hook_name must name MODEL_ID's model and LAYER_SIGNATURE's
    layer (blocks.N.hook_resid_post is block N's output), which it is then taken to be for; the caller
    checks its width.
    """
    if not settings.SAE_PATH:
        name = chosen_name(settings)
        sae, meta = TopKSAE.load(sae_folder(settings.store, name) / "topk_sae.pt", device)
        return sae, {**meta, "source": f"stage 02, SWEEP's {name!r}" if name else "stage 02"}
    folder = Path(settings.SAE_PATH)
    sealed = check_seal(folder)  # before the weights are read: a flipped byte is named, not analysed
    sae, cfg = load_saelens(folder, device)
    written_here = cfg.get("metadata") or {}
    if not sealed:
        check_saelens_place(cfg, folder, settings.MODEL_ID, settings.LAYER_SIGNATURE)
    source = (f"{folder}, sealed by this project's stage 02, checksums checked" if sealed else
              f"{folder}, from elsewhere: it has no seal, so its files are not checked against checksums")
    return sae, {"sae_id": sha256_file(folder / WEIGHTS_FILE)[:16], "source": source, "sealed": sealed,
                 "model_id": written_here.get("model_id", settings.MODEL_ID),
                 "layer_signature": written_here.get("layer_signature", settings.LAYER_SIGNATURE),
                 "saelens_metadata": written_here}
