"""Does an SAE recover the features its activations are made of? Only activations built from a known
dictionary can say: scores as SAELens's SynthSAEBench computes them (sae_lens.synthetic), for the
tests here and for bench/bench_ground_truth.py.

- MCC: the mean |cosine| of decoder rows and true features paired one to one by the matching that
  maximises it (Hungarian; sae_lens.synthetic.evals.mean_correlation_coefficient).
- Each latent as a detector of its best-matching true feature (highest |cosine|): precision, recall
  and F1 of "the latent fires" for "the feature is active" over tokens, averaged over latents (0 for
  a latent or feature that never fires), as SynthSAEBench's ClassificationMetricsCalculator.
- Variance explained, L0, dead latents (never fire on x) and shrinkage (mean |x_hat| / |x|).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ..training.sae import TopKSAE


@dataclass
class GroundTruthScores:
    mcc: float
    f1: float  # means over latents
    precision: float
    recall: float
    variance_explained: float
    l0: float
    dead_fraction: float
    shrinkage: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def synthetic_activations(n_tokens: int, d: int, n_features: int, active: int, seed: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [n, d], features [n_features, d] of unit norm, codes [n, n_features]): each token the sum of
    `active` features drawn with Zipf frequencies, magnitudes 0.5-1.5, plus a little noise. More
    features than dimensions where n_features > d. For tests; the bench uses SynthSAEBench's data."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    frequency = 1 / (torch.arange(n_features) + 5.0)
    which = torch.multinomial(frequency.expand(n_tokens, -1), active, generator=g)  # distinct features a token
    codes = torch.zeros(n_tokens, n_features).scatter_(1, which, 0.5 + torch.rand(n_tokens, active, generator=g))
    x = codes @ features + 0.01 * torch.randn(n_tokens, d, generator=g)
    return x, features, codes


@torch.no_grad()
def score_against_truth(sae: TopKSAE, x: torch.Tensor, features: torch.Tensor, codes: torch.Tensor) -> GroundTruthScores:
    """How well `sae` (in eval mode, on raw activations x) recovers `features`, active per `codes`."""
    cosine = (F.normalize(sae.W_dec, dim=1) @ F.normalize(features, dim=1).T).abs()  # [n_latents, n_features]
    latents, truths = linear_sum_assignment(cosine.numpy(), maximize=True)
    mcc = float(cosine[latents, truths].mean())

    fired = sae.dense_codes(x) != 0
    truth = codes[:, cosine.argmax(1)] > 0  # each latent's best-matching feature, active or not
    hits = (fired & truth).sum(0).float()
    precision = torch.where(fired.any(0), hits / fired.sum(0).clamp_min(1), 0.0)
    recall = torch.where(truth.any(0), hits / truth.sum(0).clamp_min(1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)

    x_hat = sae(x)
    norms = x.norm(dim=1)
    valid = norms > 1e-6
    return GroundTruthScores(mcc=mcc, f1=float(f1.mean()), precision=float(precision.mean()), recall=float(recall.mean()),
                             variance_explained=float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
                             l0=float(fired.sum(1).float().mean()), dead_fraction=float((~fired.any(0)).float().mean()),
                             shrinkage=float((x_hat.norm(dim=1)[valid] / norms[valid]).mean()))
