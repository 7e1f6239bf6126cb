"""The SAE spliced into the model: next-token cross-entropy and KL with the layer's output kept,
replaced by the SAE's reconstruction, zeroed, or replaced by its mean (stage 03's ΔCE and CE recovered)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..activations.models import replaced_output


@dataclass
class _CESums:
    nll: float = 0.0
    kl: float = 0.0


@torch.no_grad()
def splice_metrics(model, tokenizer, layer, texts: list[str], reconstruct, mean_activation: torch.Tensor,
                   max_length: int, batch_size: int = 8, progress: bool = True,
                   kept: frozenset[int] = frozenset()) -> dict[str, float]:
    """Next-token cross-entropy with the layer's output kept, replaced by `reconstruct(output)`
    (the SAE), zeroed, and replaced by `mean_activation`; KL(clean || each) per token. At the tokens
    `kept` names (EXCLUDE_TOKENS: left out of training) every variant keeps the layer's own output.

    CE-loss recovered = (CE_ablated - CE_sae) / (CE_ablated - CE_clean): 1 when splicing the SAE
    costs nothing, 0 when it is as bad as removing the layer's information. Sums are float64 and
    run over every real next-token prediction (padding excluded); log-probabilities are float32,
    their sums float64.
    """
    device = next(model.parameters()).device
    variants = {
        "sae": reconstruct,
        "zero": torch.zeros_like,
        "mean": lambda h: mean_activation.to(h.dtype).to(h.device).expand_as(h).clone(),
    }
    sums = {name: _CESums() for name in ["clean", *variants]}
    n_predictions = 0
    for start in tqdm(range(0, len(texts), batch_size), desc="CE with the SAE spliced in", disable=not progress):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length).to(device)
        targets = enc.input_ids[:, 1:]
        valid = enc.attention_mask[:, 1:].bool() & enc.attention_mask[:, :-1].bool()
        clean_logp = _next_token_logprobs(model, enc)
        sums["clean"].nll += _nll(clean_logp, targets, valid)
        clean_p = clean_logp.exp()
        # KL(clean || spliced) = sum p log p - sum p log q; the first sum is shared by every variant
        neg_entropy = (clean_p * clean_logp).sum(-1)
        at_kept = torch.isin(enc.input_ids, torch.tensor(sorted(kept), dtype=enc.input_ids.dtype, device=device))
        for name, replace in variants.items():
            with replaced_output(layer, _except_at(at_kept, replace)):
                logp = _next_token_logprobs(model, enc)
            sums[name].nll += _nll(logp, targets, valid)
            sums[name].kl += float((neg_entropy - (clean_p * logp).sum(-1))[valid].double().sum())
        n_predictions += int(valid.sum())
    ce = {name: s.nll / n_predictions for name, s in sums.items()}
    result = {f"ce_{name}": value for name, value in ce.items()}
    result.update({f"kl_{name}": sums[name].kl / n_predictions for name in variants})
    result["delta_ce"] = ce["sae"] - ce["clean"]
    for ablation in ("zero", "mean"):
        result[f"ce_recovered_vs_{ablation}"] = (ce[ablation] - ce["sae"]) / (ce[ablation] - ce["clean"])
    result["n_predictions"] = n_predictions
    return result


def _except_at(at_kept: torch.Tensor, replace):
    """`replace`, except where `at_kept` [batch, seq] is True: there the layer's output stays."""
    if not bool(at_kept.any()):
        return replace
    return lambda h: torch.where(at_kept.unsqueeze(-1), h, replace(h))


def _next_token_logprobs(model, enc) -> torch.Tensor:
    logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _nll(logp: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> float:
    return float(-logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[valid].sum())
