"""Training an SAE (TopK, or BatchTopK with ARCHITECTURE = "batchtopk") on stored activations: the
recipe of Gao et al. (2024), as EleutherAI's sparsify and OpenAI's sparse_autoencoder run it.

Recipe, and where each piece comes from:
- Inputs scaled to unit mean squared norm, so one learning rate suits any layer or model
  (Gao et al. 2024, sec. 2.1); the scale is folded back into the weights when saving.
- b_dec starts at the geometric median of a sample (Bricken et al. 2023); W_enc = W_dec^T with
  unit-norm decoder rows (Gao et al. 2024, sec. 2.4; Conerly et al. 2024).
- Every step: the decoder-gradient component parallel to each row is removed, and rows are
  renormalised after the step (Bricken et al. 2023), so the code scale lives in the encoder.
- Loss: FVU of the batch (squared error over the batch's total variance), plus AuxK: the top
  k_aux = d/2 dead latents reconstruct the residual, weight 1/32 (Gao et al. 2024, sec. A.2).
  A latent is dead when it has not fired within DEAD_WINDOW_TOKENS training tokens (by default a
  tenth of an epoch, at most 10M: Gao et al.'s 10M suits runs of billions of tokens).
- Adam, lr = LR_BASE / sqrt(n_latents / 2^14) unless LR is set: the scaling of Gao et al. 2024
  (sec. 2.3), whose base of 2e-4 suits runs of billions of tokens; a run of a million tokens on a
  CPU needs a larger base (1e-3 measured best at k = 8, observations.md), and a larger k a larger
  LR still: times (k / 8)^(1/3) (`scaled_lr`). Linear warmup, cosine decay to
  MIN_LR_FRACTION, gradient-norm clipping.
- Batches shuffled across the whole run (store.ShuffledRows); the last HELDOUT_FRACTION of
  documents are never trained on and give every epoch's metrics.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .atomic import save_torch
from .distributed import World, all_reduce_, share
from .errors import PipelineError
from .integrity import IntegrityError, content_digest
from .metrics import ReconstructionStats
from .sae import ARCHITECTURES, TopKSAE, load_plain
from .store import ActivationRun, ShuffledRows


SYNC_EVERY = 50  # on a GPU, steps between read-backs of the loss and the dead latents


class TrainingDiverged(PipelineError):
    pass


def _any_rank(flag: torch.Tensor, world: World) -> bool:
    """The flag on any rank (all ranks then stop together); reading it waits for the device."""
    if world.distributed:
        flag = all_reduce_(flag.to(torch.int32), world, "max")
    return bool(flag)


@dataclass
class TrainConfig:
    """The training settings of config.py (TrainConfig.from_settings), in the trainer's own names."""

    architecture: str
    n_latents_multiplier: int
    k: int
    epochs: int
    batch_size: int
    lr: float
    lr_base: float
    warmup_steps: int
    min_lr_fraction: float
    grad_clip: float
    auxk_coef: float
    auxk_k: int
    dead_window_tokens: int
    heldout_fraction: float
    shuffle_buffer_tokens: int
    seed: int

    @classmethod
    def from_settings(cls, s) -> "TrainConfig":
        return cls(s.ARCHITECTURE, s.N_LATENTS_MULTIPLIER, s.TOP_K, s.EPOCHS, s.BATCH_SIZE_TRAIN, s.LR, s.LR_BASE,
                   s.WARMUP_STEPS, s.MIN_LR_FRACTION, s.GRAD_CLIP, s.AUXK_COEF, s.AUXK_K, s.DEAD_WINDOW_TOKENS,
                   s.HELDOUT_FRACTION, s.SHUFFLE_BUFFER_TOKENS, s.SEED)


LR_REFERENCE_K = 8  # the TOP_K at which LR_BASE was tuned


def scaled_lr(n_latents: int, base: float, k: int) -> float:
    """base / sqrt(n_latents / 2^14) (Gao et al. 2024), times (k / 8)^(1/3): measured on the demo's
    activations, the LR tuned at k = 8 is too low for larger k (ΔCE at k = 16, 32, 64: 0.0263,
    0.0205, 0.0165 at the k = 8 LR; 0.0256, 0.0183, 0.0136 with this factor; observations.md)."""
    return base / math.sqrt(n_latents / 2 ** 14) * (k / LR_REFERENCE_K) ** (1 / 3)


def geometric_median(points: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm, started from the mean."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < 1e-6 * median.norm().clamp_min(1e-8):
            return new
        median = new
    return median


def training_sample(run: ActivationRun, stop: int, n: int = 16384) -> torch.Tensor:
    """Up to n rows spread evenly over the training range, float32."""
    indices = np.unique(np.linspace(0, stop - 1, min(n, stop)).astype(np.int64))
    return torch.from_numpy(run.take(indices))


def auxk_loss(sae: TopKSAE, x: torch.Tensor, residual: torch.Tensor, dead_idx: torch.Tensor, k_aux: int,
              total_variance: torch.Tensor) -> torch.Tensor:
    """How well the top k_aux dead latents (`dead_idx`) reconstruct what the live ones missed
    (Gao et al. 2024).

    Only the dead latents' rows enter the products, so this costs little once few are dead.
    """
    # index_select, not W[dead_idx]: its backward is an index_add, not a sorting index_put
    pre = torch.addmm(sae.b_enc.index_select(0, dead_idx), x - sae.b_dec.detach(), sae.W_enc.index_select(0, dead_idx).T)
    if k_aux >= len(dead_idx):  # every dead latent takes part (usual once training settles): no top-k to take
        codes = F.relu(pre)
    else:  # k_aux is close to the dead count, so dense codes over the dead rows are the cheap way
        top = pre.topk(k_aux, dim=-1, sorted=False)
        codes = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))
    recon = codes @ sae.W_dec.index_select(0, dead_idx)
    return ((recon - residual) ** 2).sum() / total_variance


@torch.no_grad()
def evaluate(sae: TopKSAE, run: ActivationRun, start: int, stop: int, batch_size: int = 4096,
             input_scale: float = 1.0, device: str | torch.device = "cpu",
             per_token: bool = False, world: World = World()) -> ReconstructionStats:
    """Reconstruction and sparsity of rows [start, stop), in the units of the stored activations.

    Under torchrun each rank scores a share of the rows and the sums are added up across ranks."""
    stats = ReconstructionStats(sae.n_latents, per_token=per_token)
    first, last = share(stop - start, world)
    for chunk in run.iter_rows(start + first, start + last, batch_size):
        x = torch.from_numpy(chunk).to(device)
        values, indices = sae.encode(x * input_scale)
        stats.update(x, sae.decode(values, indices) / input_scale, values, indices)
    if world.distributed:
        _add_up_across_ranks(stats, run.d_model, device, world)
    return stats


def _add_up_across_ranks(stats: ReconstructionStats, d: int, device: str | torch.device, world: World) -> None:
    sum_x = stats.sum_x if stats.sum_x is not None else torch.zeros(d, dtype=torch.float64)
    packed = torch.cat([sum_x.to(device), torch.tensor([stats.sum_sq_x, stats.sum_sq_err, stats.l0_total,
                                                        stats.n_tokens], dtype=torch.float64, device=device),
                        stats.fire_counts.to(device, torch.float64)])
    all_reduce_(packed, world)
    stats.sum_x = packed[:d].cpu()
    stats.sum_sq_x, stats.sum_sq_err = float(packed[d]), float(packed[d + 1])
    stats.l0_total, stats.n_tokens = int(packed[d + 2]), int(packed[d + 3])
    stats.fire_counts = packed[d + 4:].round().long().cpu()


def _host_batch(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """A batch on `device` as float32; to a GPU through pinned memory, without waiting for the copy."""
    tensor = torch.from_numpy(batch)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True).float()
    return tensor.to(device, torch.float32)


def _lr_factor(step: int, warmup: int, total: int, min_fraction: float) -> float:
    warm = min(1.0, (step + 1) / max(warmup, 1))
    progress = min(step / max(total, 1), 1.0)
    return warm * (min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def _load_checkpoint(path: Path) -> dict[str, Any]:
    rerun = "Drop --resume to train afresh."
    ckpt = load_plain(path, rerun)
    if not isinstance(ckpt, dict) or ckpt.pop("sha256", None) != content_digest(ckpt):
        raise IntegrityError(f"{path} is corrupt (its content does not match its checksum). {rerun}")
    return ckpt


def train_sae(run: ActivationRun, cfg: TrainConfig, checkpoint_path: Path | None = None, resume: bool = False,
              device: str | torch.device = "cpu", progress: bool = True,
              on_epoch: Callable[[dict[str, Any]], None] | None = None,
              world: World = World()) -> tuple[TopKSAE, dict[str, Any]]:
    """Train on `run`; return the SAE (working on raw activations) and its record.

    The record holds the per-epoch history, the final held-out latent frequencies, the input
    scale, the initial weights and the held-out boundary. A checkpoint is written after every
    epoch; with `resume`, training continues from it to the same result as an uninterrupted run.

    Under torchrun (data parallel) every rank draws the same shuffled global batch and trains on its
    share of it: each rank's loss is its rows' part of the global batch's loss, the gradients are
    summed across ranks, and the latents that fired are combined, so all ranks take the same step as
    one process on the whole batch would. Rank 0 writes the checkpoints; --resume works at any world
    size.
    """
    device = torch.device(device)
    # a GPU runs ahead of the host: read values back (loss, dead latents) only every SYNC_EVERY steps
    sync_every = 1 if device.type == "cpu" else SYNC_EVERY
    d, n_latents = run.d_model, cfg.n_latents_multiplier * run.d_model
    if cfg.k > n_latents:
        raise PipelineError(f"TOP_K={cfg.k} must be at most the number of latents, "
                            f"N_LATENTS_MULTIPLIER x d_model = {n_latents}")
    if cfg.architecture == "batchtopk" and world.distributed:
        # each process would take the top of its own share of the batch and keep its own threshold
        raise PipelineError("ARCHITECTURE='batchtopk' trains in one process (its batch top spans the whole batch); "
                            "run stage 02 without torchrun, or use ARCHITECTURE='topk' under torchrun")
    run.check_all(progress=progress)  # corrupt or non-finite activations stop here, before anything is written
    heldout_start = run.heldout_start(cfg.heldout_fraction)
    k_aux = cfg.auxk_k or d // 2
    steps_per_epoch = math.ceil(heldout_start / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    # a tenth of an epoch: long enough that a latent of average frequency fires ~k*window/n times in it
    window = cfg.dead_window_tokens or min(10_000_000, max(heldout_start // 10, cfg.batch_size))
    lr = cfg.lr or scaled_lr(n_latents, cfg.lr_base, cfg.k)

    sample = training_sample(run, heldout_start)
    scale = float(1 / sample.pow(2).sum(1).mean().sqrt())
    sae = ARCHITECTURES[cfg.architecture](d, n_latents, cfg.k)
    sae.init_weights(geometric_median(sample * scale), torch.Generator().manual_seed(cfg.seed))
    init = {"W_enc": sae.W_enc.detach().clone(), "W_dec": sae.W_dec.detach().clone()}
    sae.to(device).train()
    # one kernel per tensor for the whole update (the loop version was ~5 ms of a ~45 ms CPU step)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, cfg.warmup_steps, total_steps, cfg.min_lr_fraction))
    tokens_since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)
    history: list[dict[str, Any]] = []
    fingerprint = {"run_id": run.run_id, "config": asdict(cfg)}
    first_epoch = 0

    if resume and checkpoint_path is not None and checkpoint_path.exists():
        ckpt = _load_checkpoint(checkpoint_path)
        if ckpt["fingerprint"] != fingerprint:
            raise PipelineError(
                f"the checkpoint {checkpoint_path} was made with other settings or activations "
                f"({ckpt['fingerprint']}); drop --resume to start afresh, or pass the settings it used")
        sae.load_state_dict(ckpt["sae"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        tokens_since_fired = ckpt["tokens_since_fired"].to(device)
        history, first_epoch = ckpt["history"], ckpt["epoch"] + 1
        print(f"resuming after epoch {first_epoch} of {cfg.epochs} from {checkpoint_path}")

    batches = ShuffledRows(run, 0, heldout_start, cfg.batch_size, cfg.shuffle_buffer_tokens)
    stats = None
    for epoch in range(first_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])  # the data order depends only on (seed, epoch)
        bar = tqdm(batches.epoch(rng), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not progress)
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss and FVU, times the batch's tokens
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        seen = 0
        started = time.perf_counter()
        for step, batch in enumerate(bar):
            full = _host_batch(batch, device) * scale
            first, last = share(len(full), world)
            x = full[first:last]  # this rank's rows of the global batch
            total_variance = (full - full.mean(0)).pow(2).sum()
            values, indices = sae.encode(x)
            x_hat = sae.decode(values, indices)
            residual = x - x_hat
            batch_fvu = residual.pow(2).sum() / total_variance  # this rank's part of the batch's FVU
            with torch.no_grad():
                fired = torch.zeros(n_latents, dtype=torch.int32, device=device)
                fired.scatter_add_(0, indices.flatten(), (values > 0).flatten().to(torch.int32))
                all_reduce_(fired, world, "max")
                tokens_since_fired += len(full)
                tokens_since_fired.masked_fill_(fired > 0, 0)
                dead = tokens_since_fired >= window
            sync = step % sync_every == 0
            if sync:
                dead_idx = dead.nonzero().squeeze(1)  # on a GPU, kept for the next SYNC_EVERY steps
            loss = batch_fvu
            if len(dead_idx):
                loss = loss + cfg.auxk_coef * auxk_loss(sae, x, residual.detach(), dead_idx, k_aux, total_variance)
            nonfinite |= ~torch.isfinite(loss.detach())
            if sync and _any_rank(nonfinite, world):
                kept = f"the last good checkpoint (after epoch {epoch}) is kept at {checkpoint_path}" \
                    if epoch and checkpoint_path else "no epoch had finished, so there is no checkpoint"
                raise TrainingDiverged(
                    f"the loss became {loss.item()} at epoch {epoch + 1}, by step {step + 1}; {kept}. "
                    "Lower LR (or check the activations for inf/NaN) and train again.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world.distributed:
                for parameter in sae.parameters():
                    if parameter.grad is None:
                        parameter.grad = torch.zeros_like(parameter)
                    all_reduce_(parameter.grad, world)
            sae.project_decoder_grad()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            optimizer.step()
            schedule.step()
            sae.normalize_decoder()
            sums += torch.stack([loss.detach(), batch_fvu.detach()]).double() * len(full)
            seen += len(full)
            if sync:
                bar.set_postfix(loss=f"{loss.item():.4f}", fvu=f"{batch_fvu.item():.3f}", dead=len(dead_idx))
        bar.close()
        all_reduce_(sums, world)  # each rank's loss is its share of the global batch's
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the clock stops when the device's work is done
        train_seconds = time.perf_counter() - started

        sae.eval()
        stats = evaluate(sae, run, heldout_start, run.n_tokens, input_scale=scale, device=device, world=world)
        sae.train()
        loss_sum, fvu_sum = sums.tolist()
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_fvu": fvu_sum / seen,
                  **{f"heldout_{k}": v for k, v in stats.summary().items()},
                  "dead_in_window": int(dead.sum()), "lr": schedule.get_last_lr()[0],
                  "tokens_per_s": seen / train_seconds, "train_tokens": seen}
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if checkpoint_path is not None and world.is_main:
            ckpt = {"fingerprint": fingerprint, "epoch": epoch, "sae": sae.state_dict(),
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "tokens_since_fired": tokens_since_fired, "history": history}
            save_torch(checkpoint_path, {**ckpt, "sha256": content_digest(ckpt)})

    sae.eval()
    if stats is None:  # resumed after the last epoch: nothing left to train
        stats = evaluate(sae, run, heldout_start, run.n_tokens, input_scale=scale, device=device, world=world)
    sae.fold_input_scale(scale)
    record = {"history": history, "latent_frequency": stats.frequencies.tolist(), "input_scale": scale,
              "heldout_start_row": heldout_start, "n_latents": n_latents, "lr": lr, "dead_window_tokens": window,
              "k_aux": k_aux, "init": init, "config": asdict(cfg)}
    return sae, record
