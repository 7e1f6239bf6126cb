"""Training an SAE (TopK; BatchTopK with ARCHITECTURE = "batchtopk"; Matryoshka BatchTopK with
ARCHITECTURE = "matryoshka") on a layer's activations: the recipe of Gao et al. (2024), as
EleutherAI's sparsify and OpenAI's sparse_autoencoder run it.

Recipe, and where each piece comes from:
- Inputs scaled to unit mean squared norm, so one learning rate suits any layer or model
  (Gao et al. 2024, sec. 2.1); the scale is folded back into the weights when saving.
- b_dec starts at the geometric median of a sample (Bricken et al. 2023); W_enc = W_dec^T with
  unit-norm decoder rows (Gao et al. 2024, sec. 2.4; Conerly et al. 2024).
- Every step: the decoder-gradient component parallel to each row is removed, and rows are
  renormalised after the step (Bricken et al. 2023), so the code scale lives in the encoder.
- Loss: FVU of the batch (squared error over the batch's total variance; for Matryoshka the mean of
  each nested prefix's FVU, `TopKSAE.prefix_reconstructions`), plus AuxK: the top
  k_aux = d/2 dead latents reconstruct the residual, their error over the residual's own variance,
  scaled by min(n_dead / k_aux, 1), weight 1/32 (Gao et al. 2024, sec. A.2; `_Trainer.auxk_term`).
  A latent is dead when it has not fired within DEAD_WINDOW_TOKENS training tokens (by default a
  tenth of an epoch, at most 10M: Gao et al.'s 10M suits runs of billions of tokens).
- Adam, lr = LR_BASE / sqrt(n_latents / 2^14) unless LR is set: the scaling of Gao et al. 2024
  (sec. 2.3), whose base of 2e-4 suits runs of billions of tokens; a run of a million tokens on a
  CPU needs a larger base (1e-3 measured best at k = 8, observations.md), and a larger k a larger
  LR still: times (k / 8)^(1/3) (`scaled_lr`). Linear warmup, cosine decay to
  MIN_LR_FRACTION, gradient-norm clipping.
- A transcoder (TRAIN_TARGET) trains the same way on (input, target) rows, its loss the FVU of the
  target, each scaled to unit mean squared norm on its own; its initialisation and free decoder are
  sparsify's (saekit.training.sae).
- Batches shuffled in a buffer of SHUFFLE_BUFFER_TOKENS rows on the training device, from the
  stored activations or made by the model as training goes (saekit.activations.sources); the last
  HELDOUT_FRACTION of documents are never trained on and give every epoch's metrics.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..activations.sources import (RowSource, StoreRows, batches_in_epoch, heldout_copies, rows_dropped,
                                   smallest_last_batch)
from ..activations.store import ActivationRun
from ..base.atomic import save_torch
from ..base.distributed import World, all_reduce_, broadcast_object, share
from ..base.errors import PipelineError
from ..base.integrity import IntegrityError, content_digest
from ..base.memory import check_fits, training_parts
from .reconstruction import ReconstructionStats
from .kernels import resolve_kernels, step_parts, tf32
from .sae import ARCHITECTURES, BatchTopKSAE, TopKSAE, load_plain, matryoshka_prefix_ends


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
    activation_source: str = "store"
    checkpoint_seconds: float = 600.0
    select_dtype: str = "float32"
    # Matryoshka's groups but the last, as fractions of the dictionary (config.py's default)
    matryoshka_group_fractions: tuple[float, ...] = (0.03125, 0.0625, 0.125, 0.25)
    kernels: str = "auto"  # KERNELS (saekit.training.kernels)
    tf32: bool = True
    train_target: str = "sae"  # TRAIN_TARGET

    @classmethod
    def from_settings(cls, s) -> "TrainConfig":
        return cls(s.ARCHITECTURE, s.N_LATENTS_MULTIPLIER, s.TOP_K, s.EPOCHS, s.BATCH_SIZE_TRAIN, s.LR, s.LR_BASE,
                   s.WARMUP_STEPS, s.MIN_LR_FRACTION, s.GRAD_CLIP, s.AUXK_COEF, s.AUXK_K, s.DEAD_WINDOW_TOKENS,
                   s.HELDOUT_FRACTION, s.SHUFFLE_BUFFER_TOKENS, s.SEED, s.ACTIVATION_SOURCE, s.CHECKPOINT_SECONDS,
                   s.SELECT_DTYPE, tuple(float(f) for f in s.MATRYOSHKA_GROUP_FRACTIONS), s.KERNELS, s.TF32,
                   s.TRAIN_TARGET)

    def layout(self, n_latents: int, d_out: int = 0) -> dict[str, Any]:
        """The architecture's constructor arguments beyond (d_in, n_latents, k); a transcoder's output width
        `d_out` too."""
        layout = {} if self.train_target == "sae" else {"d_out": d_out, "skip": self.train_target == "skip_transcoder"}
        if self.architecture == "matryoshka":
            layout["prefix_ends"] = matryoshka_prefix_ends(n_latents, self.matryoshka_group_fractions)
        return layout

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must share to be resumed: all but the checkpoint cadence, the kernels
        and TF32 (which change only the rounding: `_Checkpoints` notes them as it notes another device),
        Matryoshka's groups only for a Matryoshka SAE and the target only for a transcoder (so checkpoints
        of before either resume)."""
        ignored = ({"checkpoint_seconds", "kernels", "tf32"}
                   | ({"matryoshka_group_fractions"} if self.architecture != "matryoshka" else set())
                   | ({"train_target"} if self.train_target == "sae" else set()))
        return {k: v for k, v in asdict(self).items() if k not in ignored}


LR_REFERENCE_K = 8  # the TOP_K at which LR_BASE was tuned


def scaled_lr(n_latents: int, base: float, k: int) -> float:
    """base / sqrt(n_latents / 2^14) (Gao et al. 2024), times (k / 8)^(1/3): measured on the demo's
    activations, the LR tuned at k = 8 is too low for larger k (ΔCE at k = 16, 32, 64: 0.0263,
    0.0205, 0.0165 at the k = 8 LR; 0.0256, 0.0183, 0.0136 with this factor; observations.md)."""
    return base / math.sqrt(n_latents / 2 ** 14) * (k / LR_REFERENCE_K) ** (1 / 3)


def select_dtype(setting: str, device: torch.device) -> torch.dtype:
    """SELECT_DTYPE: "auto" is bfloat16 where the hardware multiplies it natively (a CUDA GPU, a CPU
    with AVX512-BF16 or AMX), float32 elsewhere, where bfloat16 would be emulated and slower."""
    if setting != "auto":
        return getattr(torch, setting)
    native_on_cpu = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # AMX CPUs have it too
    native = device.type == "cuda" or (device.type == "cpu" and native_on_cpu())
    return torch.bfloat16 if native else torch.float32


def step_memory(cfg: TrainConfig, d: int, device: torch.device) -> dict[str, int]:
    """What a step's kernels make beyond the encoder's product (`step_parts`), for the memory check:
    a bfloat16 proposal is re-scored over CANDIDATES_PER_K x k candidates (BatchTopK chooses in float32)."""
    n_latents = cfg.n_latents_multiplier * d
    batch_top = issubclass(ARCHITECTURES[cfg.architecture], BatchTopKSAE)
    proposes = select_dtype(cfg.select_dtype, device) != torch.float32 and not batch_top
    candidates = min(TopKSAE.CANDIDATES_PER_K * cfg.k, n_latents) if proposes else cfg.k
    return step_parts(d, n_latents, cfg.batch_size, cfg.k, batch_top=batch_top, candidates=candidates,
                      kind=resolve_kernels(cfg.kernels, device), device=device)


def step_flops_per_token(d: int, n_latents: int, k: int) -> int:
    """A training step's floating-point operations per token, counting what is computed: the
    encoder's dense product over every latent (2 d n), and through the k chosen latents only, the
    decoder (2 k d), its two gradients (4 k d) and the encoder's (4 k d). AuxK, whose size follows the
    number of dead latents, is left out. Times tokens/s: the step's achieved FLOP/s."""
    return 2 * d * n_latents + 10 * k * d


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


def auxk_loss(sae: TopKSAE, x: torch.Tensor, residual: torch.Tensor, dead_idx: torch.Tensor, k_aux: int,
              variance: torch.Tensor) -> torch.Tensor:
    """How well the top k_aux dead latents (`dead_idx`) reconstruct what the live ones missed
    (Gao et al. 2024): their squared error over `variance`.

    Only the dead latents' rows enter the products, so this costs little once few are dead.
    """
    # index_select, not W[dead_idx]: its backward is an index_add, not a sorting index_put
    pre = torch.addmm(sae.b_enc.index_select(0, dead_idx), sae.centred(x).detach(), sae.W_enc.index_select(0, dead_idx).T)
    if k_aux >= len(dead_idx):  # every dead latent takes part (usual once training settles): no top-k to take
        codes = F.relu(pre)
    else:  # k_aux is close to the dead count, so dense codes over the dead rows are the cheap way
        top = pre.topk(k_aux, dim=-1, sorted=False)
        codes = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))
    recon = codes @ sae.W_dec.index_select(0, dead_idx)
    return ((recon - residual) ** 2).sum() / variance


@torch.no_grad()
def evaluate(sae: TopKSAE, run: ActivationRun, start: int, stop: int, batch_size: int = 4096,
             input_scale: float = 1.0, device: str | torch.device = "cpu",
             per_token: bool = False, world: World = World(), target_scale: float | None = None) -> ReconstructionStats:
    """Reconstruction and sparsity of rows [start, stop), in the units of the stored activations; a
    transcoder's prediction of the target stored beside them (its FVU is the target's).

    Under torchrun each rank scores a share of the rows and the sums are added up across ranks."""
    stats = ReconstructionStats(sae.n_latents, per_token=per_token)
    first, last = share(stop - start, world)
    target_scale = target_scale or input_scale
    for chunk in run.iter_rows(start + first, start + last, batch_size, with_target=sae.transcoder):
        rows = torch.from_numpy(chunk).to(device)
        x, y = (rows[:, :sae.d_in], rows[:, sae.d_in:]) if sae.transcoder else (rows, rows)
        values, indices = sae.encode(x * input_scale)
        stats.update(y, (sae.decode(values, indices) + sae.skip_term(x * input_scale)) / target_scale, values, indices)
    if world.distributed:
        _add_up_across_ranks(stats, sae.d_out, device, world)
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


def _lr_factor(step: int, warmup: int, total: int, min_fraction: float) -> float:
    warm = min(1.0, (step + 1) / max(warmup, 1))
    progress = min(step / max(total, 1), 1.0)
    return warm * (min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


class _Trainer:
    """The SAE, its optimizer and schedule, and how long each latent has gone unfired: everything a
    checkpoint must hold besides the data's position. `step` is one training step on one batch."""

    def __init__(self, cfg: TrainConfig, d: int, n_rows: int, device: torch.device, world: World, d_out: int = 0):
        self.cfg, self.device, self.world, self.d = cfg, device, world, d
        self.n_latents = cfg.n_latents_multiplier * d
        self.k_aux = cfg.auxk_k or d // 2
        self.steps_per_epoch = batches_in_epoch(n_rows, cfg.batch_size)
        total_steps = cfg.epochs * self.steps_per_epoch
        # a tenth of an epoch: long enough that a latent of average frequency fires ~k*window/n times in it
        self.window = cfg.dead_window_tokens or min(10_000_000, max(n_rows // 10, cfg.batch_size))
        self.lr = cfg.lr or scaled_lr(self.n_latents, cfg.lr_base, cfg.k)
        # a GPU runs ahead of the host: read values back (loss, dead latents) only every SYNC_EVERY steps
        self.sync_every = 1 if device.type == "cpu" else SYNC_EVERY
        self.sae = ARCHITECTURES[cfg.architecture](d, self.n_latents, cfg.k, **cfg.layout(self.n_latents, d_out))
        self.sae.select_dtype = select_dtype(cfg.select_dtype, device)
        self.sae.kernels = resolve_kernels(cfg.kernels, device)
        self.sae.to(device).train()
        # one kernel per tensor for the whole update (the loop version was ~5 ms of a ~45 ms CPU step)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.lr, fused=device.type in ("cpu", "cuda"))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(step, cfg.warmup_steps, total_steps, cfg.min_lr_fraction))
        self.tokens_since_fired = torch.zeros(self.n_latents, dtype=torch.long, device=device)
        self.dead = torch.zeros(self.n_latents, dtype=torch.bool, device=device)
        self.dead_idx = torch.zeros(0, dtype=torch.long, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.scale, self.target_scale, self.init = 1.0, 1.0, {}

    def initialise(self, sample: torch.Tensor) -> None:
        """Input scale (unit mean squared norm) and starting weights, from a sample of training rows; a
        transcoder's target gets a scale of its own."""
        generator = torch.Generator().manual_seed(self.cfg.seed)
        self.scale = float(1 / sample[:, :self.d].pow(2).sum(1).mean().sqrt())
        if self.sae.transcoder:
            x, y = sample[:, :self.d], sample[:, self.d:]
            self.target_scale = float(1 / y.pow(2).sum(1).mean().sqrt())
            self.sae.init_weights(y.mean(0) * self.target_scale, generator, input_mean=x.mean(0) * self.scale)
        else:
            self.target_scale = self.scale
            self.sae.init_weights(geometric_median(sample * self.scale), generator)
        self.init = {"W_enc": self.sae.W_enc.detach().cpu().clone(), "W_dec": self.sae.W_dec.detach().cpu().clone()}

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of a batch, each in float32 at its training scale; an SAE's target is its input."""
        full = batch.float()
        if not self.sae.transcoder:
            x = full * self.scale
            return x, x
        return full[:, :self.d] * self.scale, full[:, self.d:] * self.target_scale

    def step(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on one global batch (this rank takes its share); returns (loss, FVU) on the device."""
        cfg, sae, world = self.cfg, self.sae, self.world
        full, full_target = self.split(batch)
        first, last = share(len(full), world)
        x, y = full[first:last], full_target[first:last]  # this rank's rows of the global batch
        total_variance = (full_target - full_target.mean(0)).pow(2).sum()
        codes = sae.codes(x)
        reconstructions = sae.prefix_reconstructions(codes, x)  # the whole SAE's is the last
        residual = y - reconstructions[-1]
        batch_fvu = residual.pow(2).sum() / total_variance  # this rank's part of the batch's FVU
        with torch.no_grad():
            fired = torch.zeros(self.n_latents, dtype=torch.int32, device=self.device)
            fired.scatter_add_(0, codes.latents, (codes.values > 0).to(torch.int32))
            all_reduce_(fired, world, "max")
            self.tokens_since_fired += len(full)
            self.tokens_since_fired.masked_fill_(fired > 0, 0)
            self.dead = self.tokens_since_fired >= self.window
        sync = step % self.sync_every == 0
        if sync:
            self.dead_idx = self.dead.nonzero().squeeze(1)  # on a GPU, kept for the next SYNC_EVERY steps
        loss = batch_fvu  # a Matryoshka SAE's: the mean over its prefixes, each reconstructing x on its own
        if len(reconstructions) > 1:
            loss = torch.stack([(y - r).pow(2).sum() for r in reconstructions]).mean() / total_variance
        if len(self.dead_idx):
            loss = loss + cfg.auxk_coef * self.auxk_term(x, residual.detach(), len(full))
        self.nonfinite |= ~torch.isfinite(loss.detach())
        if sync and _any_rank(self.nonfinite, world):
            raise TrainingDiverged(f"the loss became {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world.distributed:
            for parameter in sae.parameters():
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                all_reduce_(parameter.grad, world)
        sae.project_decoder_grad()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        sae.normalize_decoder()
        return loss.detach(), batch_fvu.detach()

    def auxk_term(self, x: torch.Tensor, residual: torch.Tensor, global_rows: int) -> torch.Tensor:
        """AuxK as Gao et al. (2024, sec. A.2) and the peers they cite define it (openai's
        sparse_autoencoder: normalized_mse(auxk_recons, x - recons + pre_bias); sparsify; SAELens): the
        dead latents' squared error on the residual over the residual's own variance (on the global
        batch, across ranks), scaled by min(n_dead / k_aux, 1) so a few dead latents get a share of
        the coefficient, not all of it."""
        sums = torch.cat([residual.double().sum(0), residual.double().pow(2).sum().view(1)])
        if self.world.distributed:
            all_reduce_(sums, self.world)
        residual_variance = (sums[-1] - sums[:-1].pow(2).sum() / global_rows).float()
        scale = min(len(self.dead_idx) / self.k_aux, 1.0)
        return scale * auxk_loss(self.sae, x, residual, self.dead_idx, self.k_aux, residual_variance)

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.sae.parameters())

    def check_finite(self) -> None:
        """Raise TrainingDiverged if any step's loss or any parameter is not finite, on any rank. On a
        GPU the loss is read back only every SYNC_EVERY steps; this read waits for every step."""
        broken = self.nonfinite.clone()
        for parameter in self.sae.parameters():
            broken |= ~torch.isfinite(parameter.detach()).all()
        if _any_rank(broken, self.world):
            raise TrainingDiverged("the loss or the SAE's weights became non-finite (inf or NaN)")

    def state_dict(self) -> dict[str, Any]:
        return {"sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "tokens_since_fired": self.tokens_since_fired,
                "dead_idx": self.dead_idx, "scale": self.scale, "init": self.init,
                **({"target_scale": self.target_scale} if self.sae.transcoder else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        self.dead = self.tokens_since_fired >= self.window
        self.dead_idx = state["dead_idx"].to(self.device)
        self.scale, self.init = state["scale"], state["init"]
        self.target_scale = state.get("target_scale", self.scale)


@dataclass
class _EpochSums:
    """What an epoch has added up so far: loss and FVU (times the batch's tokens), tokens, steps, seconds."""

    loss: float = 0.0
    fvu: float = 0.0
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0


def resume_point(ckpt: dict[str, Any]) -> tuple[Any, int, dict[str, Any] | None, str]:
    """Where a checkpoint resumes: its history, the epoch to train next, the unfinished epoch's state
    (None after a whole epoch) and, in words, the point ("at step 12 of epoch 3", "after epoch 2")."""
    first_epoch, partial = ckpt["epoch"] + 1, ckpt["partial"]
    at = f"at step {partial['sums']['steps']} of epoch {first_epoch + 1}" if partial else f"after epoch {first_epoch}"
    return ckpt["history"], first_epoch, partial, at


def device_kind(device: torch.device) -> str:
    """The kind of device a step ran on, as a checkpoint records it: "cpu", or the GPU's name."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


class _Checkpoints:
    """checkpoint.pt: written by rank 0 after every epoch, and mid-epoch at the end of a shuffle buffer
    once CHECKPOINT_SECONDS have passed since the last one (a run on the fly may be one long epoch).

    Besides the settings and activations (`fingerprint`, which must match), a checkpoint records where
    its steps ran (`where`: the device kind and the dtype SELECT_DTYPE resolved to, which "auto" takes
    from the hardware). Resumed on the same kind of CPU, training reaches the same weights, bit for bit,
    as an uninterrupted run. Another SELECT_DTYPE resolution is refused (its steps choose latents
    differently). On another device kind or with other KERNELS (a note says so), or on a CUDA GPU
    (docs/scale.md), the result is as good but not bitwise the same."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any], where: dict[str, str], every_seconds: float,
                 world: World):
        self.path, self.fingerprint, self.where, self.every, self.world = path, fingerprint, where, every_seconds, world
        self.last_saved = time.monotonic()
        self.kept = "no epoch had finished, so there is no checkpoint"

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.exists():
            return None
        rerun = "Drop --resume to train afresh."
        ckpt = load_plain(self.path, rerun)
        if not isinstance(ckpt, dict) or ckpt.pop("sha256", None) != content_digest(ckpt):
            raise IntegrityError(f"{self.path} is corrupt (its content does not match its checksum). {rerun}")
        if ckpt["fingerprint"] != self.fingerprint:
            raise PipelineError(
                f"the checkpoint {self.path} was made with other settings or activations "
                f"({ckpt['fingerprint']}); drop --resume to start afresh, or pass the settings it used")
        made_on = ckpt.get("where", {})
        if made_on.get("select_dtype", self.where["select_dtype"]) != self.where["select_dtype"]:
            raise PipelineError(
                f"the checkpoint {self.path} chose latents in {made_on['select_dtype']} (SELECT_DTYPE resolved on "
                f"{made_on['device']}), this machine in {self.where['select_dtype']}; pass "
                f"--SELECT_DTYPE={made_on['select_dtype']} to resume it, or drop --resume to start afresh")
        if made_on.get("device") != self.where["device"] and self.world.is_main:
            print(f"note: resuming on {self.where['device']} a checkpoint made on {made_on.get('device', 'an unrecorded device')}: "
                  "training goes on as well, but not to bitwise the result of an uninterrupted run")
        elif made_on.get("kernels", "sparse") != self.where["kernels"] and self.world.is_main:  # before KERNELS: sparse
            print(f"note: resuming with KERNELS {self.where['kernels']!r} a checkpoint made with {made_on.get('kernels', 'sparse')!r}: "
                  "training goes on as well, but not to bitwise the result of an uninterrupted run")
        self.kept = f"the checkpoint this run resumed from is kept at {self.path}"
        return ckpt

    def due(self) -> bool:
        """Rank 0's clock decides for every rank, so that all take part in what a checkpoint reduces."""
        return bool(broadcast_object(time.monotonic() - self.last_saved >= self.every, self.world))

    def save(self, trainer: _Trainer, history: list[dict[str, Any]], epoch: int,
             partial: dict[str, Any] | None = None) -> None:
        """`epoch` is the last finished epoch (-1 for none); `partial`, how far the next one got."""
        if self.path is None or not self.world.is_main or not trainer.finite():  # never keep a diverged state
            return
        ckpt = {"fingerprint": self.fingerprint, "where": self.where, "epoch": epoch, "partial": partial, "history": history,
                **trainer.state_dict()}
        save_torch(self.path, {**ckpt, "sha256": content_digest(ckpt)})
        self.last_saved = time.monotonic()
        self.kept = f"the last good checkpoint (after epoch {epoch + 1}" + (
            f", step {partial['sums']['steps']} of epoch {epoch + 2}" if partial else "") + f") is kept at {self.path}"


def target_width(run: ActivationRun, cfg: TrainConfig) -> int:
    """The width a transcoder predicts (its target's, stored beside the input); 0 for an SAE."""
    return run.d_target if cfg.train_target != "sae" else 0


def prepare_training(run: ActivationRun, cfgs: dict[str, TrainConfig], source: RowSource | None,
                     device: torch.device, world: World, progress: bool) -> tuple[int, RowSource]:
    """Everything checked before anything is allocated or written, for the SAEs `cfgs` (by label: "" for
    stage 02's one SAE, a SWEEP name for each of a sweep's, which share the batches and need memory
    together); returns the held-out boundary and the source of training rows (by default the stored ones)."""
    first = next(iter(cfgs.values()))  # the SAEs share every setting that chooses the rows (and the target)
    for label, cfg in cfgs.items():
        _check_config(cfg, run.d_model, world, f"SWEEP's {label!r}: " if label else "")
    if first.train_target != "sae" and not run.d_target:
        raise PipelineError(f"TRAIN_TARGET={first.train_target!r} needs its target stored with the activations, and "
                            f"run {run.run_id} stores none: run stage 01 with TRAIN_TARGET={first.train_target!r} "
                            "(python 01_save_activations.py)")
    heldout_start = run.heldout_start(first.heldout_fraction)
    source = source or StoreRows(run, 0, heldout_start, first.batch_size, first.shuffle_buffer_tokens, device,
                                 first.seed, *heldout_copies(run, first.heldout_fraction)[::-1],
                                 with_target=first.train_target != "sae")
    parts = dict(source.memory_parts())
    for label, cfg in cfgs.items():
        n_latents = cfg.n_latents_multiplier * run.d_model
        parts.update({f"{label}: {part}" if label else part: size for part, size in
                      {**training_parts(run.d_model, n_latents, cfg.batch_size, device.type == "cpu"),
                       **step_memory(cfg, run.d_model, device)}.items()})
    check_fits("stage 02", parts, device,
               "Lower N_LATENTS_MULTIPLIER, BATCH_SIZE_TRAIN or SHUFFLE_BUFFER_TOKENS"
               + (" (or the forward's batch: BATCH_SIZE_SAVE, FORWARD_BATCH_TOKENS)" if source.kind == "model" else "")
               + (", or train fewer SAEs in SWEEP." if len(cfgs) > 1 else "."))
    # No pass over every shard first (at 100M tokens, 2 x 307 GB read before the first step): each shard's
    # checksums and finite values are checked when it is first read (ActivationRun.check_shard), in the
    # read-ahead thread during the first epoch, with the same refusal: no row is trained on before its
    # shard is verified, and the SAE is written only after the last epoch.
    if batches_in_epoch(source.n_rows, first.batch_size) == 0:
        raise PipelineError(f"the {source.n_rows} training rows make no batch of BATCH_SIZE_TRAIN={first.batch_size} "
                            f"(a last, partial batch needs at least {smallest_last_batch(first.batch_size)} rows); "
                            f"lower BATCH_SIZE_TRAIN to at most {source.n_rows}")
    return heldout_start, source


def train_sae(run: ActivationRun, cfg: TrainConfig, checkpoint_path: Path | None = None, resume: bool = False,
              device: str | torch.device = "cpu", progress: bool = True,
              on_epoch: Callable[[dict[str, Any]], None] | None = None,
              world: World = World(), source: RowSource | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Train on the batches of `source` (by default the training rows stored in `run`); evaluate
    every epoch on `run`'s held-out rows. Return the SAE (working on raw activations) and its record.

    The record holds the per-epoch history, the final held-out latent frequencies, the input
    scale, the initial weights and the held-out boundary. With `resume`, training continues from the
    checkpoint (after an epoch, or mid-epoch) to the same result as an uninterrupted run.

    Under torchrun (data parallel) every rank draws the same shuffled global batch and trains on its
    share of it: each rank's loss is its rows' part of the global batch's loss, the gradients are
    summed across ranks, and the latents that fired are combined, so all ranks take the same step as
    one process on the whole batch would. Rank 0 writes the checkpoints.
    """
    with tf32(cfg.tf32, torch.device(device)):
        return _train_sae(run, cfg, checkpoint_path, resume, device, progress, on_epoch, world, source)


def _train_sae(run: ActivationRun, cfg: TrainConfig, checkpoint_path: Path | None, resume: bool,
               device: str | torch.device, progress: bool, on_epoch: Callable[[dict[str, Any]], None] | None,
               world: World, source: RowSource | None) -> tuple[TopKSAE, dict[str, Any]]:
    device = torch.device(device)
    heldout_start, source = prepare_training(run, {"": cfg}, source, device, world, progress)
    trainer = _Trainer(cfg, run.d_model, source.n_rows, device, world, d_out=target_width(run, cfg))
    where = {"device": device_kind(device), "select_dtype": str(trainer.sae.select_dtype).removeprefix("torch."),
             "kernels": trainer.sae.kernels}
    checkpoints = _Checkpoints(checkpoint_path, {"run_id": run.run_id, "config": cfg.fingerprint()}, where,
                               cfg.checkpoint_seconds, world)
    ckpt = checkpoints.load() if resume else None
    history: list[dict[str, Any]] = []
    first_epoch, partial = 0, None
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        history, first_epoch, partial, at = resume_point(ckpt)
        print(f"resuming {at} of {cfg.epochs} from {checkpoint_path}")
    else:
        trainer.initialise(source.sample())

    stats = None
    for epoch in range(first_epoch, cfg.epochs):
        sums = _EpochSums(**partial["sums"]) if partial else _EpochSums()
        # a checkpoint holds the epoch's loss summed over ranks: resumed, rank 0 carries it, the others start at 0
        totals = torch.tensor([sums.loss, sums.fvu] if world.is_main else [0.0, 0.0], dtype=torch.float64, device=device)
        bar = tqdm(total=trainer.steps_per_epoch, initial=sums.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="step", disable=not progress)
        started = time.perf_counter() - sums.seconds
        try:
            for batch, position in source.epoch(epoch, partial["position"] if partial else None):
                loss, fvu = trainer.step(batch, sums.steps)
                totals += torch.stack([loss, fvu]).double() * len(batch)
                sums.tokens += len(batch)
                sums.steps += 1
                bar.update()
                if sums.steps % trainer.sync_every == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}", fvu=f"{fvu.item():.3f}", dead=len(trainer.dead_idx))
                if position is not None and checkpoints.due():
                    sums.loss, sums.fvu = all_reduce_(totals.clone(), world).tolist()
                    sums.seconds = time.perf_counter() - started
                    checkpoints.save(trainer, history, epoch - 1, {"position": position, "sums": asdict(sums)})
            trainer.check_finite()  # before the epoch's check and checkpoint, whatever the device's read-back cadence
        except TrainingDiverged as err:
            raise TrainingDiverged(f"{err} at epoch {epoch + 1}, by step {sums.steps + 1}; {checkpoints.kept}. "
                                   "Lower LR (or check the activations for inf/NaN) and train again.") from None
        bar.close()
        partial = None
        all_reduce_(totals, world)  # each rank's loss is its share of the global batch's
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the clock stops when the device's work is done
        seconds = time.perf_counter() - started

        stats = _evaluate(trainer, run, heldout_start, device, world, exact=epoch == cfg.epochs - 1)
        record = epoch_record(trainer, epoch, totals.tolist(), sums, seconds, stats, run.d_model)
        history.append(record)
        if on_epoch:
            on_epoch(record)
        checkpoints.save(trainer, history, epoch)

    return finish_training(trainer, run, heldout_start, source, history, stats, world)


def epoch_record(trainer: _Trainer, epoch: int, totals: list[float], sums: _EpochSums, seconds: float,
                 stats: ReconstructionStats, d: int) -> dict[str, Any]:
    """One epoch's line of the history: `totals` is the epoch's (loss, FVU) summed over its tokens."""
    loss_sum, fvu_sum = totals
    return {"epoch": epoch + 1, "train_loss": loss_sum / sums.tokens, "train_fvu": fvu_sum / sums.tokens,
            **{f"heldout_{k}": v for k, v in stats.summary().items()},
            "dead_in_window": int(trainer.dead.sum()), "lr": trainer.schedule.get_last_lr()[0],
            "tokens_per_s": sums.tokens / seconds, "train_tokens": sums.tokens,
            "step_tflops": sums.tokens / seconds * step_flops_per_token(d, trainer.n_latents, trainer.cfg.k) / 1e12}


def finish_training(trainer: _Trainer, run: ActivationRun, heldout_start: int, source: RowSource,
                    history: list[dict[str, Any]], stats: ReconstructionStats | None,
                    world: World) -> tuple[TopKSAE, dict[str, Any]]:
    """The trained SAE, working on raw activations, and its record (`stats`: the last epoch's exact
    held-out check, None when a resumed run had no epoch left to train)."""
    if stats is None:
        stats = _evaluate(trainer, run, heldout_start, trainer.device, world, exact=True)
    sae = trainer.sae.eval()
    sae.select_dtype, sae.kernels = torch.float32, TopKSAE.kernels
    sae.fold_input_scale(trainer.scale, trainer.target_scale)
    if sae.transcoder:  # the fold rescales a transcoder's encoder: its initialisation is kept in the same units
        trainer.init = {**trainer.init, "W_enc": trainer.init["W_enc"] * (trainer.scale / trainer.target_scale)}
    record = {"history": history, "latent_frequency": stats.frequencies.tolist(), "input_scale": trainer.scale,
              **({"target_scale": trainer.target_scale} if sae.transcoder else {}),
              "heldout_start_row": heldout_start, "n_latents": trainer.n_latents, "lr": trainer.lr,
              "dead_window_tokens": trainer.window, "k_aux": trainer.k_aux, "init": trainer.init,
              "rows_dropped_per_epoch": rows_dropped(source.n_rows, trainer.cfg.batch_size),
              "training_copies_of_heldout": source.copies_of_heldout,
              "activation_source": source.kind, "config": asdict(trainer.cfg)}
    return sae, record


def _evaluate(trainer: _Trainer, run: ActivationRun, heldout_start: int, device: torch.device,
              world: World, exact: bool) -> ReconstructionStats:
    """The held-out check after an epoch. Between epochs it chooses latents as the steps do (with
    SELECT_DTYPE's proposals: on the demo, FVU equal to 3e-10 and 1.8x as fast as float32); the check
    after the last epoch, whose latent frequencies the record keeps, is `exact` float32."""
    sae = trainer.sae.eval()
    chosen_in = sae.select_dtype
    if exact:
        sae.select_dtype = torch.float32
    try:
        with tf32(trainer.cfg.tf32 and not exact, device):  # the recorded frequencies are float32's, not TF32's
            return evaluate(sae, run, heldout_start, run.n_tokens, input_scale=trainer.scale, device=device,
                            world=world, target_scale=trainer.target_scale)
    finally:
        sae.select_dtype = chosen_in
        sae.train()


def _check_config(cfg: TrainConfig, d: int, world: World, label: str = "") -> None:
    """`label` starts each error: which SAE of a sweep it is about."""
    n_latents = cfg.n_latents_multiplier * d
    if cfg.k > n_latents:
        raise PipelineError(f"{label}TOP_K={cfg.k} must be at most the number of latents, "
                            f"N_LATENTS_MULTIPLIER x d_model = {n_latents}")
    try:
        cfg.layout(n_latents)
    except ValueError as err:
        raise PipelineError(f"{label}{err}") from None
    if issubclass(ARCHITECTURES[cfg.architecture], BatchTopKSAE) and world.distributed:
        # each process would take the top of its own share of the batch and keep its own threshold
        raise PipelineError(f"{label}ARCHITECTURE={cfg.architecture!r} trains in one process (its batch top spans the whole "
                            "batch); run stage 02 without torchrun, or use ARCHITECTURE='topk' under torchrun")
