"""The SAE spliced into the model: next-token cross-entropy and KL with the layer's output kept,
replaced by the SAE's reconstruction, zeroed, or replaced by its mean (stage 03's ΔCE and CE recovered).

Every figure comes with a 95% interval from a bootstrap over the evaluation texts (the texts, not
the tokens, are the independent draws: a story's tokens rise and fall together). Two SAEs scored on
the same texts compare by `paired_difference`: the bootstrap of their difference text by text, far
narrower than either interval, since the texts' own difficulty cancels."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..activations.models import length_sorted_batches, replaced_output

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # the same resamples for every SAE scored on the same texts


@dataclass
class PerText:
    """Per evaluation text: next-token predictions, and the summed NLL of each variant ("clean", "sae",
    "zero", "mean") and KL(clean || variant), float64. The figures are ratios of these sums."""

    predictions: np.ndarray
    nll: dict[str, np.ndarray] = field(default_factory=dict)
    kl: dict[str, np.ndarray] = field(default_factory=dict)

    def figures(self, texts: np.ndarray | slice = slice(None)) -> dict[str, np.ndarray]:
        """The figures over `texts` (indices, one row per resample, or all): each an array."""
        n = self.predictions[texts].sum(-1)
        ce = {name: nll[texts].sum(-1) / n for name, nll in self.nll.items()}
        out = {f"ce_{name}": value for name, value in ce.items()}
        out.update({f"kl_{name}": kl[texts].sum(-1) / n for name, kl in self.kl.items()})
        out["delta_ce"] = ce["sae"] - ce["clean"]
        for ablation in ("zero", "mean"):
            out[f"ce_recovered_vs_{ablation}"] = (ce[ablation] - ce["sae"]) / (ce[ablation] - ce["clean"])
        return out


def bootstrap_texts(n_texts: int, resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """[resamples, n_texts] indices of texts drawn with replacement, the same for every SAE."""
    return np.random.default_rng(BOOTSTRAP_SEED).integers(0, n_texts, (resamples, n_texts))


def _interval(samples: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(samples, [2.5, 97.5])]


def confidence_intervals(per_text: PerText) -> dict[str, list[float]]:
    """95% percentile intervals of every figure, by bootstrap over texts."""
    resampled = per_text.figures(bootstrap_texts(len(per_text.predictions)))
    return {name: _interval(values) for name, values in resampled.items()
            if name == "delta_ce" or name.startswith(("kl_", "ce_recovered"))}


def paired_difference(a: PerText, b: PerText, figure: str = "delta_ce") -> dict[str, float | list[float]]:
    """`figure` of SAE a minus SAE b, both scored on the same texts, with the 95% interval of a
    bootstrap that resamples the same texts for both: a difference whose interval excludes 0 is one
    these texts resolve."""
    if not np.array_equal(a.predictions, b.predictions) or not np.allclose(a.nll["clean"], b.nll["clean"]):
        raise ValueError("a paired difference needs both SAEs scored on the same texts with the same model")
    draws = bootstrap_texts(len(a.predictions))
    return {"difference": float(a.figures()[figure] - b.figures()[figure]),
            "ci95": _interval(a.figures(draws)[figure] - b.figures(draws)[figure])}


@torch.no_grad()
def splice_metrics(model, tokenizer, layer, texts: list[str], reconstruct, mean_activation: torch.Tensor,
                   max_length: int, batch_size: int = 8, progress: bool = True,
                   keep_per_text: bool = False, kept: frozenset[int] = frozenset(), fast: bool = True,
                   input_layer: nn.Module | None = None) -> dict[str, float]:
    """Next-token cross-entropy with the layer's output kept, replaced by `reconstruct(output)`
    (the SAE), zeroed, and replaced by `mean_activation`; KL(clean || each) per token; and for
    ΔCE, each KL and CE recovered, a 95% bootstrap interval over texts (`<figure>_ci95`). With
    `keep_per_text`, the per-text sums too (`per_text`, a PerText) for `paired_difference`. At the tokens
    `kept` names (EXCLUDE_TOKENS: left out of training) every variant keeps the layer's own output.

    CE-loss recovered = (CE_ablated - CE_sae) / (CE_ablated - CE_clean): 1 when splicing the SAE
    costs nothing, 0 when it is as bad as removing the layer's information. Sums are float64 and
    run over every real next-token prediction (padding excluded); log-probabilities are float32,
    their sums float64.

    Texts go in length-sorted batches (little padding), and the per-text sums come back in the
    texts' order. With `fast`, the blocks below the layer run once per batch, in the clean pass: each
    variant reuses their output and runs only the layer's block and those above (`BelowLayerCache`).
    The first batch checks that this gives the clean pass's log-probabilities; if it does not, or
    the model has no block stack around the layer, every variant runs the whole model, with a line
    that says so.

    With `input_layer` (a transcoder), `reconstruct` is given that module's output from the same forward
    pass instead of the layer's own: the layer's output is replaced by a prediction from its input.
    """
    device = next(model.parameters()).device
    capture = InputCapture(input_layer) if input_layer is not None else None
    variants = {
        "sae": reconstruct if capture is None else capture.predicting(reconstruct),
        "zero": torch.zeros_like,
        "mean": lambda h: mean_activation.to(h.dtype).to(h.device).expand_as(h).clone(),
    }
    nll: dict[str, np.ndarray] = {name: np.zeros(len(texts)) for name in ["clean", *variants]}
    kl: dict[str, np.ndarray] = {name: np.zeros(len(texts)) for name in variants}
    predictions = np.zeros(len(texts), dtype=np.int64)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length).input_ids]
    below = BelowLayerCache.around(model, layer) if fast else None
    if fast and below is None:
        print("the fast splice found no block stack around the layer: the whole model runs for each variant")
    with capture or nullcontext():
        for number, batch in enumerate(tqdm(length_sorted_batches(lengths, batch_size),
                                            desc="CE with the SAE spliced in", disable=not progress)):
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length).to(device)
            targets = enc.input_ids[:, 1:]
            valid = enc.attention_mask[:, 1:].bool() & enc.attention_mask[:, :-1].bool()
            with below.recording() if below else nullcontext():
                clean_logp = _next_token_logprobs(model, enc)
            if below and number == 0 and not below.reproduces(clean_logp, lambda: _next_token_logprobs(model, enc)):
                print("the fast splice did not reproduce the clean pass on this model: "
                      "the whole model runs for each variant")
                below = None
            nll["clean"][batch] = _nll(clean_logp, targets, valid)
            clean_p = clean_logp.exp()
            # KL(clean || spliced) = sum p log p - sum p log q; the first sum is shared by every variant
            neg_entropy = (clean_p * clean_logp).sum(-1)
            at_kept = torch.isin(enc.input_ids, torch.tensor(sorted(kept), dtype=enc.input_ids.dtype, device=device))
            for name, replace in variants.items():
                with replaced_output(layer, _except_at(at_kept, replace)), below.replaying() if below else nullcontext():
                    logp = _next_token_logprobs(model, enc)
                nll[name][batch] = _nll(logp, targets, valid)
                kl[name][batch] = _per_text(neg_entropy - (clean_p * logp).sum(-1), valid)
            predictions[batch] = valid.sum(1).cpu().numpy()
    per_text = PerText(predictions, nll, kl)
    result: dict = {name: float(value) for name, value in per_text.figures().items()}
    result.update({f"{name}_ci95": interval for name, interval in confidence_intervals(per_text).items()})
    result["n_predictions"] = int(per_text.predictions.sum())
    if keep_per_text:
        result["per_text"] = per_text
    return result


class InputCapture:
    """While entered, keeps the last output of `input_layer`; `predicting(predict)` is a replacement that
    ignores the output it replaces and returns predict(that captured input), from the same forward pass (a
    transcoder's input runs before its target; a replayed block's input is the clean pass's, the same)."""

    def __init__(self, input_layer: nn.Module):
        self.input_layer, self.captured, self._handle = input_layer, None, None

    def __enter__(self) -> "InputCapture":
        self._handle = self.input_layer.register_forward_hook(self._keep)
        return self

    def __exit__(self, *_exc) -> None:
        self._handle.remove()

    def _keep(self, _module, _inputs, output) -> None:
        self.captured = output[0] if isinstance(output, tuple) else output

    def predicting(self, predict):
        def replace(h: torch.Tensor) -> torch.Tensor:
            if self.captured is None or self.captured.shape[:-1] != h.shape[:-1]:
                raise RuntimeError("the transcoder's input layer did not run before its target in this forward pass")
            return predict(self.captured.float())
        return replace


def _except_at(at_kept: torch.Tensor, replace):
    """`replace`, except where `at_kept` [batch, seq] is True: there the layer's output stays."""
    if not bool(at_kept.any()):
        return replace
    return lambda h: torch.where(at_kept.unsqueeze(-1), h, replace(h))


class BelowLayerCache:
    """The blocks below the spliced layer compute the same thing for every variant: this records the
    output of the last of them in the clean pass and, while replaying, makes each of them return it
    without computing. When the layer is a whole block, that block is replayed too (the splice hook
    still replaces its output); for a module inside a block, its block runs in full."""

    # how long the first batch's check lets the replayed clean pass differ from the computed one, in
    # log-probability: it is the same arithmetic on the same input, so on a CPU the two are equal
    REPRODUCE_TOLERANCE = 1e-4

    def __init__(self, skipped: list[nn.Module]) -> None:
        self.skipped = skipped
        self.output = None

    @classmethod
    def around(cls, model: nn.Module, layer: nn.Module) -> "BelowLayerCache | None":
        """The cache for `layer`, or None where no block stack (an nn.ModuleList of numbered
        blocks, the outermost one holding the layer) is found or no block lies below the layer."""
        names = {module: name for name, module in model.named_modules()}
        layer_name = names.get(layer)
        if layer_name is None:
            return None
        for name, stack in model.named_modules():  # outermost first: the decoder's blocks, not an inner list
            if not isinstance(stack, nn.ModuleList) or not layer_name.startswith(name + "."):
                continue
            index = layer_name[len(name) + 1:].split(".")[0]
            if not index.isdigit():
                return None
            last = int(index) if layer_name == f"{name}.{index}" else int(index) - 1
            return cls(list(stack[:last + 1])) if last >= 0 else None
        return None

    @contextmanager
    def recording(self) -> Iterator[None]:
        def keep(_module, _inputs, output):
            self.output = output

        handle = self.skipped[-1].register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def _replay(self, *_args, **_kwargs):
        # a copy: a block above may add to its input in place
        if isinstance(self.output, tuple):
            return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in self.output)
        return self.output.clone()

    @contextmanager
    def replaying(self) -> Iterator[None]:
        own = [block.__dict__.get("forward") for block in self.skipped]
        for block in self.skipped:
            block.forward = self._replay
        try:
            yield
        finally:
            for block, forward in zip(self.skipped, own):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward

    def reproduces(self, clean_logp: torch.Tensor, forward: Callable[[], torch.Tensor]) -> bool:
        """Whether replaying gives the clean pass's log-probabilities."""
        with self.replaying():
            replayed = forward()
        return bool(torch.allclose(replayed, clean_logp, rtol=0, atol=self.REPRODUCE_TOLERANCE))


def _next_token_logprobs(model, enc) -> torch.Tensor:
    logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _per_text(values: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """Each text's sum of `values` over its real predictions, float64."""
    return values.double().masked_fill(~valid, 0).sum(1).cpu().numpy()


def _nll(logp: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    return _per_text(-logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), valid)
