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
                   layer_rows: int = 0, rows_dtype: torch.dtype = torch.float32,
                   input_layer: nn.Module | None = None) -> dict[str, float]:
    """Next-token cross-entropy with the layer's output kept, replaced by `reconstruct(output)`
    (the SAE), zeroed, and replaced by `mean_activation`; KL(clean || each) per token; and for
    ΔCE, each KL and CE recovered, a 95% bootstrap interval over texts (`<figure>_ci95`). With
    `keep_per_text`, the per-text sums too (`per_text`, a PerText) for `paired_difference`. At the tokens
    `kept` names (EXCLUDE_TOKENS: left out of training) every variant keeps the layer's own output.
    With `layer_rows`, the clean pass's layer output of the first `layer_rows` texts too (`layer_rows`, a
    list of [tokens, d] in `rows_dtype`, as stage 01 and the probes embed a text), so that sparse probing
    need not run those texts through the model again.

    CE-loss recovered = (CE_ablated - CE_sae) / (CE_ablated - CE_clean): 1 when splicing the SAE
    costs nothing, 0 when it is as bad as removing the layer's information. Sums are float64 and
    run over every real next-token prediction (padding excluded); log-probabilities are float32,
    their sums float64.

    Texts go in length-sorted batches (little padding), and the per-text sums come back in the
    texts' order. With `fast`, the blocks below the layer run once per batch, in the clean pass; the
    three variants then run together, as one batch three times the size, through the layer's block and
    those above, reusing the clean pass's output of the blocks below (`BelowLayerCache`); and the
    head (a vocabulary wide) runs on the real predictions only. The first batch checks that this gives
    the whole model's log-probabilities; if it does not, or the model has no block stack around the
    layer, every variant runs the whole model, one at a time, with a line that says so.

    With `input_layer` (a transcoder), `reconstruct` is given that module's output from the same forward
    pass instead of the layer's own: the layer's output is replaced by a prediction from its input. The
    rows kept for the first `layer_rows` texts are then that input's, the rows the transcoder encodes.
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
    rows: list[torch.Tensor | None] = [None] * min(layer_rows, len(texts))
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length).input_ids]
    below = BelowLayerCache.around(model, layer) if fast else None
    if fast and below is None:
        print("the fast splice found no block stack around the layer: the whole model runs for each variant")
    with capture or nullcontext():
        for number, batch in enumerate(tqdm(length_sorted_batches(lengths, batch_size),
                                            desc="CE with the SAE spliced in", disable=not progress)):
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length).to(device)
            valid = enc.attention_mask[:, 1:].bool() & enc.attention_mask[:, :-1].bool()
            text_of = valid.nonzero()[:, 0]  # the text (in the batch) of each real prediction, in order
            targets = enc.input_ids[:, 1:][valid]
            wanted = [(j, i) for j, i in enumerate(batch) if i < len(rows)]
            keeping = _layer_output(input_layer or layer, enc.attention_mask, wanted, rows, rows_dtype)
            with below.recording() if below else nullcontext(), keeping:
                clean_logp = _prediction_logprobs(model, enc, valid, at_predictions=below is not None)
            if below and number == 0:
                whole = _prediction_logprobs(model, enc, valid, at_predictions=False)
                if not below.reproduces(lambda: _prediction_logprobs(model, enc, valid, at_predictions=True), whole):
                    print("the fast splice did not reproduce the clean pass on this model: "
                          "the whole model runs for each variant")
                    below, clean_logp = None, whole
            nll["clean"][batch] = _per_text(-clean_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), text_of, len(batch))
            clean_p = clean_logp.exp()
            # KL(clean || spliced) = sum p log p - sum p log q; the first sum is shared by every variant
            neg_entropy = _row_dot(clean_p, clean_logp)
            at_kept = torch.isin(enc.input_ids, torch.tensor(sorted(kept), dtype=enc.input_ids.dtype, device=device))
            for name, logp in _variant_logprobs(model, layer, enc, valid, variants, at_kept, below):
                nll[name][batch] = _per_text(-logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), text_of, len(batch))
                kl[name][batch] = _per_text(neg_entropy - _row_dot(clean_p, logp), text_of, len(batch))
            predictions[batch] = valid.sum(1).cpu().numpy()
    per_text = PerText(predictions, nll, kl)
    result: dict = {name: float(value) for name, value in per_text.figures().items()}
    result.update({f"{name}_ci95": interval for name, interval in confidence_intervals(per_text).items()})
    result["n_predictions"] = int(per_text.predictions.sum())
    if keep_per_text:
        result["per_text"] = per_text
    if layer_rows:
        result["layer_rows"] = rows
    return result


def _variant_logprobs(model, layer, enc, valid: torch.Tensor, variants: dict[str, Callable], at_kept: torch.Tensor,
                      below: "BelowLayerCache | None") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, log-probabilities [predictions, vocabulary]) of each variant. With `below`, the variants
    run as one batch, each its own copy of the texts, through the blocks from the layer's up (the
    blocks below replay the clean pass); otherwise the whole model runs for each."""
    if below is None:
        for name, replace in variants.items():
            with replaced_output(layer, _except_at(at_kept, replace)):
                yield name, _prediction_logprobs(model, enc, valid, at_predictions=False)
        return
    n, copies = len(enc.input_ids), len(variants)
    replaces = [_except_at(at_kept, replace) for replace in variants.values()]

    def each_copy(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([replace(part) for replace, part in zip(replaces, h.split(n))])

    joint = {key: enc[key].repeat(copies, 1) for key in ("input_ids", "attention_mask")}
    with replaced_output(layer, each_copy), below.replaying(copies):
        logits = _prediction_logits(model, joint, valid.repeat(copies, 1), at_predictions=True)
    for name, part in zip(variants, logits.split(len(logits) // copies)):
        yield name, torch.log_softmax(part.float(), dim=-1)


@contextmanager
def _layer_output(layer: nn.Module, attention_mask: torch.Tensor, wanted: list[tuple[int, int]],
                  rows: list[torch.Tensor | None], dtype: torch.dtype) -> Iterator[None]:
    """Keeps rows[i] = the layer's output on text i's real tokens, for each (j, i) in `wanted` (j: its
    place in the batch), as stage 01 keeps a document's rows."""
    if not wanted:
        yield
        return

    def keep(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        for j, i in wanted:
            rows[i] = hidden[j][attention_mask[j].bool()].to("cpu", dtype)

    handle = layer.register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()


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
            captured = self.captured
            if captured is not None and len(captured) > len(h) and len(captured) % len(h) == 0:
                # the variants' joint batch (each a copy of the texts) ran the input layer: every copy's input
                # is the clean one, since it runs before the output replaced, so the first copy's serves
                captured = captured[:len(h)]
            if captured is None or captured.shape[:-1] != h.shape[:-1]:
                raise RuntimeError("the transcoder's input layer did not run before its target in this forward pass")
            return predict(captured.float())
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

    def _replayed(self, copies: int):
        def copy(t):  # a copy even of one: a block above may add to its input in place
            return t.repeat(copies, *[1] * (t.dim() - 1)) if isinstance(t, torch.Tensor) and t.dim() else t

        def replay(*_args, **_kwargs):
            if isinstance(self.output, tuple):
                return tuple(copy(t) for t in self.output)
            return copy(self.output)

        return replay

    @contextmanager
    def replaying(self, copies: int = 1) -> Iterator[None]:
        """The blocks below return the recorded output, repeated `copies` times along the batch (the
        model's input then holds as many copies of the recorded batch)."""
        own = [block.__dict__.get("forward") for block in self.skipped]
        replay = self._replayed(copies)
        for block in self.skipped:
            block.forward = replay
        try:
            yield
        finally:
            for block, forward in zip(self.skipped, own):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward

    def reproduces(self, forward: Callable[[], torch.Tensor], whole: torch.Tensor) -> bool:
        """Whether `forward` replaying the recorded output gives `whole`, the whole model's log-probabilities."""
        with self.replaying():
            replayed = forward()
        return replayed.shape == whole.shape and bool(torch.allclose(replayed, whole, rtol=0,
                                                                     atol=self.REPRODUCE_TOLERANCE))


def _prediction_logits(model, enc, valid: torch.Tensor, at_predictions: bool) -> torch.Tensor:
    """The logits [predictions, vocabulary] of the real next-token predictions (`valid` [batch, seq - 1]).
    With `at_predictions`, the head (a vocabulary wide: on SmolLM2 a fifth of the model) and what the model
    does after it (Gemma2's soft cap) see only those positions' hidden states, not padding's or the last's."""
    head = model.get_output_embeddings() if at_predictions else None

    def only_predictions(_module, args):
        return (args[0][:, :-1][valid], *args[1:])

    handle = head.register_forward_pre_hook(only_predictions) if head is not None else None
    try:
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits if head is not None else logits[:, :-1][valid]


def _prediction_logprobs(model, enc, valid: torch.Tensor, at_predictions: bool) -> torch.Tensor:
    return torch.log_softmax(_prediction_logits(model, enc, valid, at_predictions).float(), dim=-1)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each row's a . b, as a batched matrix product: no [predictions, vocabulary] product is made."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).flatten()


def _per_text(values: torch.Tensor, text_of: torch.Tensor, n_texts: int) -> np.ndarray:
    """Each text's sum of `values` (one per real prediction; `text_of` says whose), float64."""
    return torch.zeros(n_texts, dtype=torch.float64, device=values.device).index_add_(
        0, text_of, values.double()).cpu().numpy()
