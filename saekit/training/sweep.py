"""SWEEP: several SAEs trained on the same batches, and where each SAE of the store lives.

Each batch is read from the store, or made by the model on the fly, once, and every SAE of the sweep
takes its training step on it (train.py's `_Trainer.step`, unchanged): an SAE of a sweep gets the
weights its own run with the same settings and seed would get, while the rows are read (on the fly:
the model run) once for all. One checkpoint holds every SAE's state, so `--resume` continues them
together; under torchrun every SAE takes the data-parallel step it takes alone.

Paths: without SWEEP, stage 02's one SAE is store/sae_model/topk_sae.pt with
store/training_history.json; with SWEEP, each SAE is store/sweep/<name>/ (topk_sae.pt,
training_history.json, saelens/), the sweep's checkpoint store/sweep_checkpoint.pt, and the SAE
stages 04-05 read is SWEEP_CHOICE, or the one stage 03 chose (store/sweep_choice.json).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..activations.sources import RowSource
from ..activations.store import ActivationRun
from ..base.distributed import World, all_reduce_
from ..base.errors import PipelineError
from ..base.integrity import read_sealed_json
from ..base.settings import Settings, sweep_name, sweep_variant
from .kernels import tf32
from .sae import TopKSAE
from .train import (TrainConfig, TrainingDiverged, _Checkpoints, _EpochSums, _evaluate, _Trainer, device_kind,
                    epoch_record, finish_training, prepare_training, resume_point, target_width)

SWEEP_DIR = "sweep"
CHOICE_FILE = "sweep_choice.json"  # beside the folder, so that no SWEEP name can clash with it
CHECKPOINT_FILE = "sweep_checkpoint.pt"


@dataclass(frozen=True)
class Variant:
    """One SAE of a sweep: its SWEEP name and its training settings."""

    name: str
    cfg: TrainConfig


def sweep_variants(settings: Settings) -> list[Variant]:
    """SWEEP's entries as training settings: config.py's, with each entry's keys over them."""
    values, base = settings.as_dict(), TrainConfig.from_settings(settings)
    variants = []
    for entry in settings.SWEEP:
        v = sweep_variant(entry, values)
        variants.append(Variant(sweep_name(entry, values), replace(
            base, architecture=v["ARCHITECTURE"], k=int(v["TOP_K"]), n_latents_multiplier=int(v["N_LATENTS_MULTIPLIER"]),
            lr=float(v["LR"]))))
    return variants


def sae_folder(store: Path, name: str | None = None) -> Path:
    """Where an SAE of stage 02 lives: store/sae_model without a name, store/sweep/<name> with one."""
    return store / "sae_model" if name is None else store / SWEEP_DIR / name


def history_path(store: Path, name: str | None = None) -> Path:
    return store / "training_history.json" if name is None else sae_folder(store, name) / "training_history.json"


def chosen_name(settings: Settings) -> str | None:
    """The SAE of the sweep that stages 03-05 analyse: SWEEP_CHOICE, else the one stage 03 chose; None
    without SWEEP (stage 02's one SAE)."""
    if not settings.SWEEP:
        return None
    if settings.SWEEP_CHOICE:
        return settings.SWEEP_CHOICE
    names = [v.name for v in sweep_variants(settings)]
    path = settings.store / CHOICE_FILE
    if not path.is_file():
        raise PipelineError(f"SWEEP trains {len(names)} SAEs and stage 03 has not chosen one yet: run stage 03 "
                            f"(03_analyze_training.ipynb), or set SWEEP_CHOICE to one of {', '.join(names)}")
    chosen = read_sealed_json(path, "Run stage 03 again.")["chosen"]
    if chosen not in names:
        raise PipelineError(f"stage 03 chose {chosen!r} ({path}), which the current SWEEP does not train: run stage 03 "
                            f"again, or set SWEEP_CHOICE to one of {', '.join(names)}")
    return chosen


class _Sweep:
    """The sweep's trainers, as a checkpoint sees one trainer."""

    def __init__(self, trainers: list[_Trainer]):
        self.trainers = trainers

    def finite(self) -> bool:
        return all(t.finite() for t in self.trainers)

    def state_dict(self) -> dict[str, Any]:
        return {"trainers": [t.state_dict() for t in self.trainers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for trainer, own in zip(self.trainers, state["trainers"]):
            trainer.load_state_dict(own)


def train_sweep(run: ActivationRun, variants: list[Variant], checkpoint_path: Path | None = None,
                resume: bool = False, device: str | torch.device = "cpu", progress: bool = True,
                world: World = World(), source: RowSource | None = None,
                on_epoch: Callable[[int], None] | None = None) -> dict[str, tuple[TopKSAE, dict[str, Any]]]:
    """Train every variant on the same batches of `source` (by default `run`'s stored training rows);
    return each one's SAE and record by name, as `train_sae` returns them for one SAE. The variants
    share every setting but TOP_K, N_LATENTS_MULTIPLIER, ARCHITECTURE and LR (sweep_variants)."""
    with tf32(variants[0].cfg.tf32, torch.device(device)):
        return _train_sweep(run, variants, checkpoint_path, resume, device, progress, world, source, on_epoch)


def _train_sweep(run: ActivationRun, variants: list[Variant], checkpoint_path: Path | None, resume: bool,
                 device: str | torch.device, progress: bool, world: World, source: RowSource | None,
                 on_epoch: Callable[[int], None] | None) -> dict[str, tuple[TopKSAE, dict[str, Any]]]:
    device = torch.device(device)
    heldout_start, source = prepare_training(run, {v.name: v.cfg for v in variants}, source, device, world, progress)
    trainers = [_Trainer(v.cfg, run.d_model, source.n_rows, device, world, d_out=target_width(run, v.cfg))
                for v in variants]
    sweep, shared = _Sweep(trainers), variants[0].cfg  # epochs, seed, batches and checkpoint cadence are shared
    where = {"device": device_kind(device), "select_dtype": str(trainers[0].sae.select_dtype).removeprefix("torch."),
             "kernels": trainers[0].sae.kernels}
    checkpoints = _Checkpoints(checkpoint_path, {"run_id": run.run_id, "sweep": {v.name: v.cfg.fingerprint() for v in variants}},
                               where, shared.checkpoint_seconds, world)
    ckpt = checkpoints.load() if resume else None
    histories: list[list[dict[str, Any]]] = [[] for _ in variants]
    first_epoch, partial = 0, None
    if ckpt is not None:
        sweep.load_state_dict(ckpt)
        histories, first_epoch, partial, at = resume_point(ckpt)
        print(f"resuming the sweep of {len(variants)} SAEs {at} of {shared.epochs} from {checkpoint_path}")
    else:
        sample = source.sample()  # one sample: every SAE starts from the input scale and median its own run would
        for trainer in trainers:
            trainer.initialise(sample)

    last_stats: list[Any] = [None] * len(variants)
    for epoch in range(first_epoch, shared.epochs):
        sums = _EpochSums(**partial["sums"]) if partial else _EpochSums()  # steps, tokens and time are shared
        # each SAE's (loss, FVU) summed over the epoch's tokens; resumed, rank 0 carries them, the others start at 0
        carried = partial["totals"] if partial and world.is_main else [[0.0, 0.0]] * len(variants)
        totals = torch.tensor(carried, dtype=torch.float64, device=device)
        bar = tqdm(total=trainers[0].steps_per_epoch, initial=sums.steps, desc=f"epoch {epoch + 1}/{shared.epochs}, "
                   f"{len(variants)} SAEs", unit="step", disable=not progress)
        started = time.perf_counter() - sums.seconds
        current = 0
        try:
            for batch, position in source.epoch(epoch, partial["position"] if partial else None):
                for current, trainer in enumerate(trainers):
                    loss, fvu = trainer.step(batch, sums.steps)
                    totals[current] += torch.stack([loss, fvu]).double() * len(batch)
                sums.tokens += len(batch)
                sums.steps += 1
                bar.update()
                if position is not None and checkpoints.due():
                    sums.seconds = time.perf_counter() - started
                    checkpoints.save(sweep, histories, epoch - 1, {"position": position, "sums": asdict(sums),
                                                                   "totals": all_reduce_(totals.clone(), world).tolist()})
            for current, trainer in enumerate(trainers):
                trainer.check_finite()
        except TrainingDiverged as err:
            raise TrainingDiverged(f"SWEEP's {variants[current].name!r}: {err} at epoch {epoch + 1}, by step "
                                   f"{sums.steps + 1}; {checkpoints.kept}. Lower its LR (a SWEEP entry's 'LR') and "
                                   "train again.") from None
        bar.close()
        partial = None
        all_reduce_(totals, world)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started  # the sweep's: tokens/s in each history is every SAE's steps together
        for i, trainer in enumerate(trainers):
            last_stats[i] = _evaluate(trainer, run, heldout_start, device, world, exact=epoch == shared.epochs - 1)
            histories[i].append(epoch_record(trainer, epoch, totals[i].tolist(), sums, seconds, last_stats[i], run.d_model))
        if on_epoch:
            on_epoch(epoch + 1)
        checkpoints.save(sweep, histories, epoch)

    names = [v.name for v in variants]
    trained = {}
    for variant, trainer, history, stats in zip(variants, trainers, histories, last_stats):
        sae, record = finish_training(trainer, run, heldout_start, source, history, stats, world)
        trained[variant.name] = (sae, {**record, "sweep": {"name": variant.name, "trained_with": names}})
    return trained
