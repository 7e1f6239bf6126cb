"""Stage 03: everything that decides whether training worked, computed from the stored artifacts.

The notebook calls these in order, prints the results and draws them with saekit.show.plots; the
checks and the verdict (saekit.evaluation.verdict) are also written to store/analysis.json. With SAE_PATH set,
the SAE is one in SAELens's format, analysed on the store's activations: it has no training
history and no known initialisation, so those parts are left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from ..activations.data import load_role_texts
from ..activations.models import detect_device, resolve_layer
from ..activations.stage import load_stage_model
from ..activations.store import ActivationRun, check_run_matches, excluded_token_ids, open_run, role_token_ids
from ..base.atomic import write_json
from ..base.distributed import World
from ..base.errors import PipelineError
from ..base.integrity import read_sealed_json
from ..base.settings import Settings
from ..training.sae import RERUN_02, TopKSAE, check_sae_matches, check_sae_width
from ..training.saelens_format import load_sae
from ..training.sweep import chosen_name, history_path
from ..training.train import evaluate
from .probing import probe_fields
from .splice import splice_metrics
from .verdict import passed


@dataclass
class TrainedSAE:
    """The SAE of stage 02 with its history and the activations it was trained on, or SAE_PATH's SAE
    (history None) with the store's current activations."""

    sae: TopKSAE
    meta: dict[str, Any]
    history: dict[str, Any] | None
    run: ActivationRun

    @property
    def heldout_start(self) -> int:
        return self.meta["heldout_start_row"]


def load_trained_sae(settings: Settings, name: str | None = None) -> TrainedSAE:
    """The SAE stages 03-05 analyse, or with `name`, that SAE of the sweep."""
    store = settings.store
    if name is not None:
        settings = Settings(**{**settings.as_dict(), "SWEEP_CHOICE": name})
    sae, meta = load_sae(settings)
    check_sae_matches(meta, settings.MODEL_ID, settings.LAYER_SIGNATURE, settings.target)
    if settings.SAE_PATH:
        run = open_run(store)
        check_run_matches(run, settings.MODEL_ID, settings.LAYER_SIGNATURE)
        run.exclude_tokens(settings.EXCLUDE_TOKENS)
        check_sae_width(sae, run.d_model, settings.LAYER_SIGNATURE)
        meta = {**meta, "activation_run_id": run.run_id, "heldout_start_row": run.heldout_start(settings.HELDOUT_FRACTION)}
        return TrainedSAE(sae, meta, None, run)
    history = read_sealed_json(history_path(store, chosen_name(settings)), RERUN_02)
    if history.get("sae_id") != meta["sae_id"]:
        raise PipelineError("training_history.json and topk_sae.pt do not belong together (stage 02 was "
                            f"interrupted between them, or one was replaced). {RERUN_02}")
    run = open_run(store, meta["activation_run_id"])
    run.exclude_tokens(settings.EXCLUDE_TOKENS)  # the held-out metrics leave out what training left out
    return TrainedSAE(sae, meta, history, run)


def heldout_tokens(trained: TrainedSAE) -> dict[str, Any]:
    """Reconstruction of every held-out token: overall stats, and L0 and error per token."""
    stats = evaluate(trained.sae, trained.run, trained.heldout_start, trained.run.n_tokens, per_token=True)
    summary = {**stats.summary(), "token_set": heldout_token_set(trained)}
    return {"stats": stats, "summary": summary, "l0_per_token": stats.per_token_l0(),
            "per_token_fvu": stats.per_token_fvu()}


def heldout_token_set(trained: TrainedSAE) -> str:
    """Which tokens "held-out" FVU, L0 and dead latents count: stage 02's held-out rows of the
    activation run, not the evaluation texts that the CE figures and stages 04-05 use."""
    run = trained.run
    left_out = f" (token ids {sorted(run.excluded)} left out: EXCLUDE_TOKENS)" if run.excluded else ""
    return (f"the {run.count_kept(trained.heldout_start, run.n_tokens)} tokens{left_out} of the last documents of "
            f"activation run {run.run_id} "
            f"(from row {trained.heldout_start}; texts of {run.meta.get('source', run.meta.get('dataset'))}) that "
            "training never saw")


def weight_report(trained: TrainedSAE) -> dict[str, dict[str, float]] | None:
    """How far each weight matrix moved from its initialisation, and its value statistics; None when
    the initialisation is unknown (an SAE from SAE_PATH)."""
    if "init" not in trained.meta:
        return None
    return weight_change(trained.sae, trained.meta["init"])


def weight_change(sae: TopKSAE, init: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per encoder and decoder: the relative Frobenius change from `init`, and value statistics."""
    report = {}
    for name in ("W_enc", "W_dec"):
        trained_w = getattr(sae, name).detach()
        init_w = init[name]
        # a transcoder's decoder starts at zero: moved anywhere, it moved by all of itself
        scale = init_w.norm() if init_w.norm() > 0 else trained_w.norm().clamp_min(1e-30)
        report[name] = {"relative_change": float((trained_w - init_w).norm() / scale),
                        "mean": float(trained_w.mean()), "std": float(trained_w.std()),
                        "init_mean": float(init_w.mean()), "init_std": float(init_w.std())}
    return report


def mean_training_activation(run: ActivationRun, stop: int, batch_size: int = 65536,
                             target: bool = False) -> torch.Tensor:
    """The mean of the run's rows before `stop` (its training rows), which mean-ablation puts in the
    layer's place (`target`: the mean of a transcoder's target, which mean-ablation puts in the MLP's
    place). A run saved for training on the fly holds no training rows: then the mean of its
    held-out rows, an estimate of the same mean."""
    stop = stop or run.n_tokens
    total = np.zeros(run.d_model + run.d_target * target, np.float64)
    for chunk in run.iter_rows(0, stop, batch_size, with_target=target):
        total += chunk.sum(0, dtype=np.float64)
    return torch.from_numpy(total[run.d_model if target else 0:] / max(run.count_kept(0, stop), 1)).float()


@dataclass
class LayerModel:
    """The model with its tokenizer and the SAE's layer, loaded once for stage 03's splice and probing; a
    transcoder's target module too (`target`, else None)."""

    model: Any
    tokenizer: Any
    layer: Any
    device: torch.device
    # the layer's output on evaluation texts (text -> [tokens, d], the run's dtype), which splice_report's
    # clean pass computes anyway and sparse probing would otherwise run through the model again
    evaluation_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    target: Any = None


def load_layer_model(settings: Settings) -> LayerModel:
    """The model in MODEL_DTYPE, by the rule of every stage (saekit.activations.stage.load_stage_model):
    the SAE is judged in the model whose activations trained it."""
    device = detect_device(settings.DEVICE)
    model, tokenizer = load_stage_model(settings, device, World())
    target = resolve_layer(model, settings.target, "TARGET_SIGNATURE") if settings.target else None
    return LayerModel(model, tokenizer, resolve_layer(model, settings.LAYER_SIGNATURE), device, target=target)


def splice_report(settings: Settings, trained: TrainedSAE, progress: bool = True,
                  loaded: LayerModel | None = None, keep_per_text: bool = False) -> dict[str, float]:
    """CE and KL with the SAE spliced into the model (`loaded`, or loaded here), on EVAL_SPLIT texts. A
    transcoder is spliced in place of its target (the MLP): the MLP's output is replaced by the
    transcoder's prediction from the MLP's input, and zero- and mean-ablation ablate the MLP."""
    loaded = loaded or load_layer_model(settings)
    texts = load_role_texts(settings, "eval")
    sae = trained.sae.to(loaded.device)
    transcoder = sae.transcoder
    mean = mean_training_activation(trained.run, trained.heldout_start, target=transcoder)
    excluded = excluded_token_ids(settings.EXCLUDE_TOKENS, role_token_ids(loaded.tokenizer))
    # the probes' evaluation stories are the first of these texts: their layer output is kept for them
    probed = 0 if probe_fields(settings)[1] else min(settings.PROBE_TEXTS, len(texts))
    spliced_at, input_layer = (loaded.target, loaded.layer) if transcoder else (loaded.layer, None)
    result = splice_metrics(loaded.model, loaded.tokenizer, spliced_at, texts.texts, sae, mean, settings.MAX_LENGTH,
                            batch_size=settings.BATCH_SIZE_SAVE, progress=progress, kept=excluded,
                            layer_rows=probed, rows_dtype=getattr(torch, trained.run.meta["dtype"]),
                            input_layer=input_layer, keep_per_text=keep_per_text)
    loaded.evaluation_rows = dict(zip(texts.texts, result.pop("layer_rows", [])))
    if transcoder:  # what the verdict then says it measured
        result["spliced_as"] = (f"with the {sae.kind.replace('_', ' ')} spliced in place of {settings.target} (its "
                                f"output predicted from {settings.LAYER_SIGNATURE})")
    result["n_texts"] = len(texts)
    result["model_dtype"] = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    result["n_texts_asked"] = settings.EVAL_DATA_LIMIT
    if progress:
        print("CE figures on " + texts.summary())
    result["eval_texts_in_training"] = trained.run.count_embedded(texts.hashes())
    return result


def splice_table(splice: dict[str, Any]) -> list[dict[str, Any]]:
    """Stage 03's table of the splice: each figure, with its 95% bootstrap interval over texts where it
    has one (ΔCE, KL, CE recovered)."""
    rows = []
    for name, value in splice.items():
        if name.endswith("_ci95") or not isinstance(value, (int, float)):
            continue
        low, high = splice.get(f"{name}_ci95", (None, None))
        rows.append({"figure": name, "value": value, "95% CI low": low, "95% CI high": high})
    return rows


def write_analysis(settings: Settings, trained: TrainedSAE, checks: list[dict[str, Any]], heldout: dict[str, float],
                   weights: dict[str, Any], splice: dict[str, float],
                   sparse_probing: dict[str, Any] | None = None) -> dict[str, Any]:
    """store/analysis.json: the verdict and its figures, and the sparse probing (saekit.evaluation.probing), which
    is reported beside the verdict, not part of it."""
    payload = {"passed": passed(checks), "checks": checks, "heldout": heldout,
               "weights": weights, "splice": splice, "sparse_probing": sparse_probing,
               "activation_run_id": trained.run.run_id,
               "sae_id": trained.meta["sae_id"],
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "settings": settings.as_dict()}
    write_json(settings.store / "analysis.json", payload)
    return payload
