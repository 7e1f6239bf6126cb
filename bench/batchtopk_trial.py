"""BatchTopK (Bussmann et al. 2024) in stage 02's recipe, against TopK at the same k, before it earns
a setting: does it lower ΔCE at equal mean L0 on the demo's activations?

BatchTopK keeps the k x batch largest pre-activations of the whole batch instead of k per token,
so tokens share a budget of active latents; for inference a single threshold replaces the batch
(here, as in SAELens, an exponential moving average of the smallest value kept in each batch).
Implemented for this trial as a subclass swapped into saekit.train, so stage 02 is untouched:
per token the 4k largest pre-activations are candidates (a token rarely takes more than 4k of the
batch's budget), and the batch's top k x batch among them are kept.

    .venv/bin/python bench/batchtopk_trial.py [--TOP_K=8 ...]      # ~10 minutes on 2 quiet cores

Writes bench/results/batchtopk_trial.json.
"""
import sys

import torch
import torch.nn.functional as F

from common import save_result, table

import saekit.train
from saekit.analysis import mean_training_activation
from saekit.data import load_role_texts
from saekit.metrics import splice_metrics
from saekit.models import load_model, resolve_layer
from saekit.sae import TopKSAE, _RowDot
from saekit.settings import load_settings
from saekit.store import open_run
from saekit.train import TrainConfig, evaluate, train_sae

EVAL_TEXTS = 100
CANDIDATES_PER_K = 4
THRESHOLD_LR = 0.01  # SAELens's topk_threshold_lr


class BatchTopKSAE(TopKSAE):
    def __init__(self, d_in: int, n_latents: int, k: int):
        super().__init__(d_in, n_latents, k)
        self.n_candidates = min(CANDIDATES_PER_K * k, n_latents)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_centred = x - self.b_dec
        with torch.no_grad():
            top = (x_centred @ self.W_enc.T + self.b_enc).topk(self.n_candidates, dim=-1, sorted=False)
        if not self.training:
            return F.relu(top.values) * (top.values > self.threshold), top.indices
        with torch.no_grad():
            flat = F.relu(top.values).flatten()
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[flat.topk(self.k * len(x), sorted=False).indices] = True
            keep = keep.view_as(top.values) & (top.values > 0)
            if keep.any():
                smallest = top.values[keep].min().double()
                self.threshold.mul_(1 - THRESHOLD_LR).add_(THRESHOLD_LR * smallest)
        values = _RowDot.apply(x_centred, self.W_enc, top.indices) + self.b_enc[top.indices]
        return F.relu(values) * keep, top.indices

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.threshold /= scale


settings = load_settings(sys.argv[1:])
run = open_run(settings.store)
model, tokenizer = load_model(settings.MODEL_ID, "cpu", cache_dir=settings.store / "models")
layer = resolve_layer(model, settings.LAYER_SIGNATURE)
texts = load_role_texts(load_settings(sys.argv[1:] + [f"--EVAL_DATA_LIMIT={EVAL_TEXTS}"]), "eval").texts
rows = []
for architecture, cls in (("topk", TopKSAE), ("batchtopk", BatchTopKSAE)):
    saekit.train.TopKSAE = cls
    sae, record = train_sae(run, TrainConfig.from_settings(settings), progress=False)
    heldout_start = record["heldout_start_row"]
    heldout = evaluate(sae, run, heldout_start, run.n_tokens).summary()
    splice = splice_metrics(model, tokenizer, layer, texts, sae, mean_training_activation(run, heldout_start),
                            settings.MAX_LENGTH, batch_size=settings.BATCH_SIZE_SAVE, progress=False)
    row = {"architecture": architecture, "k": settings.TOP_K, "l0": heldout["l0"], "heldout_fvu": heldout["fvu"],
           "dead": heldout["dead"], "delta_ce": splice["delta_ce"], "recovered_vs_mean": splice["ce_recovered_vs_mean"],
           "kl": splice["kl_sae"], "threshold": float(getattr(sae, "threshold", 0.0)), "splice": splice}
    rows.append(row)
    print(table([row], list(row)[:-1]), flush=True)
saekit.train.TopKSAE = TopKSAE
print(table(rows, list(rows[0])[:-1]))
path = save_result("batchtopk_trial", "python bench/batchtopk_trial.py " + " ".join(sys.argv[1:]),
                   {"run_id": run.run_id, "eval_texts": len(texts), "results": rows})
print(f"wrote {path}")
