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
