"""The seed's SAE recipe through mi_crow's SaeTrainer (the seed's 02_train_sae.py settings: batch 32,
lr 1e-3, l1 1e-4), trained on the store's training rows. Shared by bench_train.py and
verdict_calibration.py."""
from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

MI_CROW = dict(batch_size=32, lr=1e-3, l1_lambda=1e-4)  # the seed's 02_train_sae.py


def train_mi_crow(settings, run, heldout_start: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(overcomplete engine in eval mode, {"train_seconds", "mi_crow_reported_r2"}).

    The engine maps rows [n, d] to (pre_codes, codes, x_hat)."""
    from mi_crow.mechanistic.sae.modules.topk_sae import TopKSae, TopKSaeTrainingConfig
    from mi_crow.store.local_store import LocalStore

    d = run.d_model
    layer = settings.LAYER_SIGNATURE
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(base_path=tmp)
        # the same training rows, in mi_crow's layout: batches of [1, rows, d], padding-free
        for i, lo in enumerate(range(0, heldout_start, 2048)):
            rows = torch.from_numpy(run.rows(lo, min(heldout_start, lo + 2048))).unsqueeze(0)
            store.put_detector_metadata("acts", i, {layer: {"activations_shape": list(rows.shape)}},
                                        {layer: {"activations": rows}})
        store.put_run_metadata("acts", {"layer_signatures": [layer], "run_name": "acts"})
        sae = TopKSae(n_latents=settings.N_LATENTS_MULTIPLIER * d, n_inputs=d, device="cpu", store=store)
        config = TopKSaeTrainingConfig(k=settings.TOP_K, epochs=settings.EPOCHS, device="cpu", verbose=False,
                                       use_amp=False, clip_grad=1.0, monitoring=1, memory_efficient=True, **MI_CROW)
        started = time.perf_counter()
        result = sae.train(store, "acts", layer, config)
        seconds = time.perf_counter() - started
    r2 = result["history"].get("r2", [None])
    return sae.sae_engine.eval(), {"train_seconds": seconds, "mi_crow_reported_r2": r2[-1]}


class MiCrowReconstruction(torch.nn.Module):
    """mi_crow's engine as a reconstruction of activations of any shape [..., d] (for splicing)."""

    def __init__(self, engine: torch.nn.Module):
        super().__init__()
        self.engine = engine

    @torch.no_grad()
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.engine(h.reshape(-1, h.shape[-1]))[2].reshape(h.shape)
