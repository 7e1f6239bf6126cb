"""Metrics of reconstruction and sparsity, accumulated exactly across batches.

FVU (fraction of variance unexplained) = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, with the
per-dimension mean of all tokens seen and both sums accumulated in float64, so the result does not
depend on how the tokens were batched. R^2 = 1 - FVU. (overcomplete's r2 subtracts one scalar mean
over all dimensions, which inflates it when dimensions have different means: see observations.md.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .models import replaced_output

DENSE_FREQUENCY = 0.1  # a latent firing on more than this share of tokens is "dense"


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """FVU of one set of tokens [n, d], in float64."""
    x, x_hat = x.double(), x_hat.double()
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@dataclass
class ReconstructionStats:
    """Streams (x, x_hat, active latents) batches; reports FVU, MSE, L0 and latent frequencies."""

    n_latents: int
    n_tokens: int = 0
    sum_x: torch.Tensor | None = None
    sum_sq_x: float = 0.0
    sum_sq_err: float = 0.0
    l0_total: int = 0
    per_token: bool = False  # also keep each token's L0 and squared error (stage 03's histograms)
    fire_counts: torch.Tensor = field(init=False)
    _token_l0: list[torch.Tensor] = field(init=False, default_factory=list)
    _token_sq_err: list[torch.Tensor] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.fire_counts = torch.zeros(self.n_latents, dtype=torch.long)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        x64 = x.double()
        self.sum_x = x64.sum(0) if self.sum_x is None else self.sum_x + x64.sum(0)
        self.sum_sq_x += float((x64 ** 2).sum())
        sq_err = ((x64 - x_hat.double()) ** 2).sum(1)
        self.sum_sq_err += float(sq_err.sum())
        active = values > 0
        if self.per_token:
            self._token_l0.append(active.sum(1).cpu())
            self._token_sq_err.append(sq_err.cpu())
        self.l0_total += int(active.sum())
        self.fire_counts += torch.bincount(indices[active].flatten().cpu(), minlength=self.n_latents)
        self.n_tokens += len(x)

    @property
    def total_variance(self) -> float:
        return self.sum_sq_x - float((self.sum_x ** 2).sum()) / self.n_tokens

    @property
    def fvu(self) -> float:
        return self.sum_sq_err / self.total_variance

    @property
    def mse(self) -> float:
        """Mean squared error per token (summed over dimensions)."""
        return self.sum_sq_err / self.n_tokens

    @property
    def l0(self) -> float:
        return self.l0_total / self.n_tokens

    @property
    def frequencies(self) -> torch.Tensor:
        return self.fire_counts.double() / max(self.n_tokens, 1)

    def per_token_l0(self) -> np.ndarray:
        return torch.cat(self._token_l0).numpy()

    def per_token_fvu(self) -> np.ndarray:
        """Each token's squared error over the average token's variance."""
        return torch.cat(self._token_sq_err).numpy() / (self.total_variance / self.n_tokens)

    def summary(self) -> dict[str, float]:
        freq = self.frequencies
        return {"fvu": self.fvu, "r2": 1 - self.fvu, "mse": self.mse, "l0": self.l0,
                "dead": int((self.fire_counts == 0).sum()),
                "dead_fraction": float((self.fire_counts == 0).double().mean()),
                "dense": int((freq > DENSE_FREQUENCY).sum()), "n_tokens": self.n_tokens}


def overcomplete_r2(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """R^2 as overcomplete (and so mi_crow's history) computes it: one scalar mean for all
    dimensions. Kept to measure how far it departs from 1 - FVU."""
    x, x_hat = x.double(), x_hat.double()
    return float(1 - ((x - x_hat) ** 2).mean() / (((x - x.mean()) ** 2).mean() + 1e-6))


# --- the SAE spliced into the model ----------------------------------------------------------

@dataclass
class _CESums:
    nll: float = 0.0
    kl: float = 0.0


@torch.no_grad()
def splice_metrics(model, tokenizer, layer, texts: list[str], reconstruct, mean_activation: torch.Tensor,
                   max_length: int, batch_size: int = 8, progress: bool = True) -> dict[str, float]:
    """Next-token cross-entropy with the layer's output kept, replaced by `reconstruct(output)`
    (the SAE), zeroed, and replaced by `mean_activation`; KL(clean || each) per token.

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
        for name, replace in variants.items():
            with replaced_output(layer, replace):
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


def _next_token_logprobs(model, enc) -> torch.Tensor:
    logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _nll(logp: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> float:
    return float(-logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[valid].sum())
