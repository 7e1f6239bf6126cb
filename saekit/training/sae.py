"""Sparse autoencoders: TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), the
default; BatchTopK (Bussmann et al. 2024), ARCHITECTURE = "batchtopk"; and Matryoshka BatchTopK
(Bussmann et al. 2025), ARCHITECTURE = "matryoshka".

    z = TopK(ReLU(W_enc (x - b_dec) + b_enc))        x_hat = W_dec^T z + b_dec

W_enc and W_dec are both stored [n_latents, d_in], so a latent's encoder and decoder directions
are rows of the same index. Codes are kept sparse, as (values, indices) of the active latents:
decoding sums k decoder rows (embedding_bag), and in training the gradient reaches only those k
rows of W_enc, so a step costs one dense product (the encoder's forward) instead of three.

A saved SAE works on raw activations: the input scale used in training is folded into the biases
(see `fold_input_scale`), decoder rows keep unit norm, and latent activations are in the units of
the layer's output.

Each class is also a transcoder (TRAIN_TARGET; Dunefsky et al. 2024, Paulo et al. 2025) when built
with `d_out`: it encodes the input x as an SAE does, without centring it on b_dec, and decodes into
another module's output y of width d_out, b_dec being y's bias:

    z = TopK(ReLU(W_enc x + b_enc))        y_hat = W_dec^T z + b_dec  (+ W_skip x, a skip transcoder)

As in sparsify (`transcode`, `skip_connection`), the decoder starts at zero and is not held at unit
norm (its rows' norms are how much each latent writes), and W_skip, a plain linear map, starts at zero.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base.atomic import save_torch
from ..base.errors import PipelineError
from ..base.integrity import IntegrityError, content_digest
from . import kernels
from .kernels import Codes

FORMAT = "saekit.topk_sae/2"
RERUN_02 = "Train it again: python 02_train_sae.py"


class SAEFileError(PipelineError):
    pass


class TopKSAE(nn.Module):
    architecture = "topk"
    k_optional = False  # True where an SAE can work without a k (a JumpReLU SAE made elsewhere)
    # The dtype of the dense product that proposes each token's active latents (a training step's
    # one dense product); the choice among the proposals, the values and every gradient stay
    # float32. bfloat16 runs that product 2.4x as fast on a CPU with AVX512-BF16 (observations.md).
    # Only the trainer sets it, for its steps and its held-out checks between epochs; the SAE it
    # returns, and so every later stage, selects in float32.
    select_dtype: torch.dtype = torch.float32
    # KERNELS (saekit.training.kernels): how a step multiplies through its active latents; set by the trainer
    kernels: str = "sparse"
    CANDIDATES_PER_K = 2  # a lower-precision product's top 2k are re-scored in float32, and the top k of those win

    def __init__(self, d_in: int, n_latents: int, k: int | None, *, d_out: int | None = None, skip: bool = False):
        super().__init__()
        if not (k is None and self.k_optional) and not (isinstance(k, int) and 0 < k <= n_latents):
            raise ValueError(f"TOP_K must be between 1 and n_latents={n_latents}, got {k}")
        if skip and d_out is None:
            raise ValueError("a skip term belongs to a transcoder: give d_out")
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.transcoder = d_out is not None
        self.d_out = d_out if self.transcoder else d_in
        self.W_enc = nn.Parameter(torch.zeros(n_latents, d_in))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.zeros(n_latents, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in)) if skip else None

    @property
    def kind(self) -> str:
        """What it was trained to do, as TRAIN_TARGET says it: "sae", "transcoder" or "skip_transcoder"."""
        return "skip_transcoder" if self.W_skip is not None else "transcoder" if self.transcoder else "sae"

    @torch.no_grad()
    def init_weights(self, b_dec: torch.Tensor, generator: torch.Generator | None = None,
                     input_mean: torch.Tensor | None = None) -> None:
        """An SAE: unit-norm random decoder rows, encoder tied to the decoder (W_enc = W_dec), zero
        b_enc, and b_dec at the data's centre (Gao et al. 2024, section 2.4; Bricken et al. 2023).

        A transcoder (`input_mean`: its input's mean; `b_dec`: its target's): unit-norm random encoder
        rows with b_enc = -W_enc input_mean, so pre-activations start centred as an SAE's do through
        b_dec (sparsify's equivalent of it); a zero decoder, as sparsify starts a transcoder's, since a
        random one would add noise to a prediction no tied encoder lines up with; a zero skip term."""
        w = torch.randn(self.n_latents, self.d_in, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_enc.copy_(w)
        self.b_dec.copy_(b_dec)
        if self.transcoder:
            if input_mean is None:
                raise ValueError("a transcoder's initialisation needs its input's mean")
            self.b_enc.copy_(-(w @ input_mean))
            self.W_dec.zero_()
            if self.W_skip is not None:
                self.W_skip.zero_()
            return
        self.W_dec.copy_(w)
        self.b_enc.zero_()

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder reads: x - b_dec for an SAE; x itself for a transcoder, whose b_dec is its
        target's bias (SAELens's and sparsify's transcoders alike)."""
        return x if self.transcoder else x - self.b_dec

    def skip_term(self, x: torch.Tensor) -> torch.Tensor | float:
        """A skip transcoder's linear term W_skip x; 0 otherwise."""
        return x @ self.W_skip.T if self.W_skip is not None else 0.0

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(W_enc (x - b_dec) + b_enc) for every latent (a transcoder: of x): [..., n_latents]."""
        return F.relu(self.centred(x) @ self.W_enc.T + self.b_enc)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k active latents of each row of x [batch, d_in] as (values, indices), each [batch, k]."""
        codes = self.codes(x)
        return codes.values.view(len(x), -1), codes.latents.view(len(x), -1)

    def codes(self, x: torch.Tensor) -> Codes:
        """The active latents of x [batch, d_in] as `Codes`, differentiable in their values: what a
        training step decodes."""
        x_centred, pre = self._pre_activations(x)
        if pre.dtype == x_centred.dtype:
            indices = pre.topk(self.k, dim=-1, sorted=False).indices
            return self._chosen(x_centred, Codes.per_row(pre.gather(1, indices), indices))
        with torch.no_grad():  # the lower-precision product only proposes candidates; float32 decides
            proposed = pre.topk(min(self.CANDIDATES_PER_K * self.k, self.n_latents), dim=-1, sorted=False)
            candidates = Codes.per_row(proposed.values, proposed.indices)
            exact = (kernels.row_dots(candidates, self.W_enc, x_centred, self.kernels)
                     + self.b_enc[candidates.latents]).view(len(x), -1)
            top = exact.topk(self.k, dim=-1, sorted=False).indices
        indices = candidates.latents.view(len(x), -1).gather(1, top)
        return self._chosen(x_centred, Codes.per_row(exact.gather(1, top), indices))

    def _pre_activations(self, x: torch.Tensor, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(x - b_dec, its pre-activations for every latent); the latter outside autograd, and in
        `select_dtype` unless `exact`."""
        x_centred = self.centred(x)
        with torch.no_grad():
            if not exact and self.select_dtype != x.dtype:
                low = self.select_dtype
                return x_centred, torch.addmm(self.b_enc.to(low), x_centred.to(low), self.W_enc.to(low).T)
            return x_centred, torch.addmm(self.b_enc, x_centred, self.W_enc.T)

    def _chosen(self, x_centred: torch.Tensor, codes: Codes) -> Codes:
        """The codes with their values (the chosen pre-activations) ReLU'd, differentiable through the
        chosen latents' encoder rows."""
        return codes.with_values(F.relu(kernels.chosen(codes, x_centred, self.W_enc, self.b_enc, self.kernels)))

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sum of the active latents' decoder rows, weighted by their values, plus b_dec."""
        return self.decode_codes(Codes.per_row(values, indices))

    def decode_codes(self, codes: Codes) -> torch.Tensor:
        return kernels.decode(codes, self.W_dec, self.kernels) + self.b_dec

    @property
    def prefix_ends(self) -> tuple[int, ...]:
        """Where each nested prefix of the dictionary that training reconstructs with ends: the whole
        dictionary only, except in a Matryoshka SAE."""
        return (self.n_latents,)

    def prefix_reconstructions(self, codes: Codes, x: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The reconstruction by each prefix of `prefix_ends` (latents [0, end) only), the whole SAE's last.
        Each is a decode of the same codes with those past the prefix zeroed, so it costs k rows a token.
        A skip transcoder adds its skip term of the input `x` to each."""
        skip = self.skip_term(x) if self.W_skip is not None else 0.0
        return [self.decode_codes(codes.with_values(codes.values * (codes.latents < end))) + skip
                for end in self.prefix_ends[:-1]] + [self.decode_codes(codes) + skip]

    def layout(self) -> dict[str, Any]:
        """What besides d_in, n_latents and k the constructor needs to rebuild this SAE (saved with it)."""
        return {"d_out": self.d_out, "skip": self.W_skip is not None} if self.transcoder else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of x, or a transcoder's prediction of its target from x: [..., d_out]."""
        flat = x.reshape(-1, self.d_in)
        return (self.decode(*self.encode(flat)) + self.skip_term(flat)).reshape(*x.shape[:-1], self.d_out)

    def dense_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes as a dense [..., n_latents] tensor (zeros off the top k)."""
        flat = x.reshape(-1, self.d_in)
        values, indices = self.encode(flat)
        codes = torch.zeros(len(flat), self.n_latents, dtype=values.dtype, device=values.device)
        codes.scatter_(1, indices, values)
        return codes.reshape(*x.shape[:-1], self.n_latents)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each decoder row, so that the step after it
        changes the rows' direction, not their norm (Bricken et al. 2023). A transcoder's rows are free."""
        if self.W_dec.grad is not None and not self.transcoder:  # in place, no [n_latents, d] temporaries
            self.W_dec.grad.addcmul_(torch.linalg.vecdot(self.W_dec.grad, self.W_dec).unsqueeze(1), self.W_dec, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if not self.transcoder:  # a zero-initialised transcoder decoder has no direction to keep
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def fold_input_scale(self, scale: float, target_scale: float | None = None) -> None:
        """Make an SAE trained on (scale * x) work on x itself.

        W_enc (s x - b_dec) + b_enc = s (W_enc (x - b_dec / s) + b_enc / s): with b_dec and b_enc
        divided by s, the same latents win and their values shrink by s; then W_dec^T (z / s) +
        b_dec / s is the reconstruction of s x divided by s. Decoder rows keep unit norm.

        A transcoder trained to predict t y (`target_scale`) from s x: W_enc s x + b_enc =
        t ((s / t) W_enc x + b_enc / t), so with W_enc times s / t and b_enc over t the same latents
        win with values in y's units; W_dec stays, b_dec is divided by t, and W_skip s x / t makes
        W_skip times s / t.
        """
        if not self.transcoder:
            self.b_dec /= scale
            self.b_enc /= scale
            return
        self.W_enc *= scale / target_scale
        self.b_enc /= target_scale
        self.b_dec /= target_scale
        if self.W_skip is not None:
            self.W_skip *= scale / target_scale

    # --- saving -----------------------------------------------------------------------------

    def save(self, path: str | Path, **metadata: Any) -> str:
        """Atomically write weights and metadata (layer, model id, run id, settings, ...) as plain
        tensors and values, with the checksum of all of it; return the SAE's id (its checksum, short)."""
        blob = {"format": FORMAT, "architecture": self.architecture, "d_in": self.d_in, "n_latents": self.n_latents, "k": self.k,
                **({"layout": self.layout()} if self.layout() else {}),
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}, "metadata": metadata}
        blob["sha256"] = content_digest(blob)
        save_torch(path, blob)
        return sae_id(blob["sha256"])

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> tuple["TopKSAE", dict[str, Any]]:
        """(sae, metadata) from a file written by `save`, as the architecture it was trained with;
        metadata["sae_id"] names these weights.

        Reads with weights_only=True, so a crafted file cannot run code; checks the content checksum."""
        path = Path(path)
        if not path.exists():
            raise SAEFileError(f"no trained SAE at {path}. Run stage 02 first: python 02_train_sae.py")
        blob = load_plain(path, f"{RERUN_02}, or ask for the file again")
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise SAEFileError(f"{path} is not an SAE saved by this version of the project (format {FORMAT}). "
                               f"{RERUN_02}")
        expected = blob.pop("sha256", None)
        if expected != content_digest(blob):
            raise IntegrityError(f"{path} is corrupt (its content does not match its checksum). {RERUN_02}")
        architecture = ARCHITECTURES.get(blob.get("architecture", "topk"))  # files of before BatchTopK are TopK
        if architecture is None:
            raise SAEFileError(f"{path} holds a {blob['architecture']!r} SAE, which this version does not know. {RERUN_02}")
        sae = architecture(blob["d_in"], blob["n_latents"], blob["k"], **blob.get("layout", {}))
        sae.load_state_dict(blob["state_dict"])
        return sae.to(device).eval(), {**blob["metadata"], "sae_id": sae_id(expected)}


class BatchTopKSAE(TopKSAE):
    """BatchTopK (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

    In training the k x batch largest pre-activations of the whole batch are kept, so tokens share
    a budget of k active latents on average: a token with more going on takes more. For inference
    (eval mode) a latent is active where its pre-activation exceeds `threshold`, a JumpReLU, so a
    token's codes do not depend on the rest of its batch. The threshold is a moving average of the
    smallest value kept in each training batch (`_update_threshold`), as in SAELens, which saves
    the same SAE as a JumpReLU. It is stored per latent so that a JumpReLU SAE from
    SAELens (its own threshold per latent, no k) loads into this class too.

    Inference is not differentiable (nothing in the project differentiates an SAE in eval mode).
    """

    architecture = "batchtopk"
    k_optional = True
    THRESHOLD_RATE = 0.01  # SAELens's topk_threshold_lr

    def __init__(self, d_in: int, n_latents: int, k: int | None, **target: Any):
        super().__init__(d_in, n_latents, k, **target)
        self.register_buffer("threshold", torch.zeros(n_latents))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.float64))  # batches averaged so far

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) [batch, width]; padded with zero values where a row has fewer active.
        The batch-wide choice is made in float32 whatever `select_dtype`."""
        if self.training:
            return self.codes(x).padded()
        with torch.no_grad():
            _, pre = self._pre_activations(x, exact=True)
            codes = F.relu(pre) * (pre > self.threshold)
            width = max(int((codes > 0).sum(1).max()) if len(codes) else 1, 1)
            top = codes.topk(width, dim=-1, sorted=False)
        return top.values, top.indices

    def codes(self, x: torch.Tensor) -> Codes:
        if not self.training:
            return Codes.per_row(*self.encode(x))
        if self.k is None:
            raise ValueError("this BatchTopK SAE has no k, so it cannot be trained; set one")
        x_centred, pre = self._pre_activations(x, exact=True)
        with torch.no_grad():
            flat = self._batch_top(pre, self.k * len(x))
            values = pre.flatten()[flat]
            self._update_threshold(values.masked_fill(values <= 0, torch.inf).min())
        return self._chosen(x_centred, Codes.from_flat(values, flat, len(x), self.n_latents))

    def _update_threshold(self, smallest_kept: torch.Tensor) -> None:
        """Move the threshold towards the batch's smallest kept value: a running mean over the first
        1 / THRESHOLD_RATE batches, an exponential moving average after. SAELens starts its average
        at 0, which leaves the threshold a third short after 100 steps (L0 39 for k = 8 after the
        demo's first epoch); the mean is right from the first batch. Nothing here is read back to
        the host."""
        found = torch.isfinite(smallest_kept)  # false only when no code in the batch is positive
        self.threshold_updates += found.to(self.threshold_updates.dtype)
        rate = torch.clamp(1 / self.threshold_updates.clamp_min(1), min=self.THRESHOLD_RATE) * found
        self.threshold += rate * (torch.where(found, smallest_kept, 0.0) - self.threshold)

    @staticmethod
    def _batch_top(pre: torch.Tensor, budget: int) -> torch.Tensor:
        """Where the batch's `budget` largest ReLU'd pre-activations are, as ascending positions in the
        flattened [batch, n_latents] matrix (those that are zero get zero values).

        One top-k over the whole batch: a row takes as many as it is owed, however many, in memory of
        the order of `pre` itself, and nothing is read back to the host. (It replaced a per-row top-4k
        widened while a row kept all of its own, which could widen to every latent on a batch with a
        BOS-like outlier row, and read a flag back every step.)"""
        flat = F.relu(pre).flatten()
        return flat.topk(min(budget, len(flat)), sorted=False).indices.sort().values

    @torch.no_grad()
    def fold_input_scale(self, scale: float, target_scale: float | None = None) -> None:
        super().fold_input_scale(scale, target_scale)
        self.threshold /= target_scale if self.transcoder else scale  # pre-activations shrink by the same factor


def matryoshka_prefix_ends(n_latents: int, group_fractions: Sequence[float]) -> tuple[int, ...]:
    """The ends of the nested prefixes for groups taking `group_fractions` of `n_latents` (rounded
    down), and a last group taking the rest; ValueError where a group would be empty."""
    ends, end = [], 0
    for fraction in group_fractions:
        end += int(fraction * n_latents)
        ends.append(end)
    ends.append(n_latents)
    if any(b <= a for a, b in zip([0] + ends, ends)):
        raise ValueError(f"MATRYOSHKA_GROUP_FRACTIONS={tuple(group_fractions)} leaves a group of the {n_latents} "
                         "latents empty: give fewer or larger fractions, summing to less than 1")
    return tuple(ends)


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
    Sparse Autoencoders"; Nabeshima 2025).

    The dictionary is split into groups, and each prefix (the first group, the first two, ..., all)
    is trained to reconstruct the input on its own from the same BatchTopK codes: the loss is the
    mean of the prefixes' FVUs (dictionary_learning's equal group weights; SAELens sums the same
    terms, which differs by a constant factor). Early latents must then carry the general features
    alone, so a general feature is not absorbed into its more specific children. Everything else is
    BatchTopK's: the JumpReLU threshold for inference, AuxK on the whole SAE's residual (both
    peers' default), unit-norm decoder rows. Saved for SAELens as a JumpReLU, as SAELens does.
    """

    architecture = "matryoshka"

    def __init__(self, d_in: int, n_latents: int, k: int | None, *, prefix_ends: Sequence[int], **target: Any):
        super().__init__(d_in, n_latents, k, **target)
        ends = tuple(int(e) for e in prefix_ends)
        if not ends or ends[-1] != n_latents or any(b <= a for a, b in zip((0,) + ends, ends)):
            raise ValueError(f"Matryoshka prefix ends must increase from above 0 to n_latents={n_latents}, got {ends}")
        self._prefix_ends = ends

    @property
    def prefix_ends(self) -> tuple[int, ...]:
        return self._prefix_ends

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "prefix_ends": list(self._prefix_ends)}


ARCHITECTURES: dict[str, type[TopKSAE]] = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "matryoshka": MatryoshkaSAE}


def sae_id(digest: str) -> str:
    """The short name of an SAE's weights that every artifact made from it records."""
    return digest[:16]


def load_plain(path: Path, rerun: str) -> Any:
    """torch.load restricted to tensors and plain values: unpickling anything else (code) is refused."""
    import pickle
    import re
    import warnings
    import zipfile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about a pickle protocol it then refuses anyway
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" (it asks for {found.group(1)})" if found else ""
        raise IntegrityError(f"{path} does not read back as weights and plain values{what}: it is corrupt or was "
                             f"not written by this project, and is not loaded, so no code in it runs. {rerun}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as err:
        raise IntegrityError(f"{path} is truncated or corrupt ({type(err).__name__}). {rerun}") from None


def check_sae_matches(metadata: dict[str, Any], model_id: str, layer_signature: str, target: str | None = None) -> None:
    """Stop a stage from attaching an SAE to a model or layer other than the one it was trained on, or a
    transcoder to another target (`target`: Settings.target; None for an SAE)."""
    for key, setting, value in (("model_id", "MODEL_ID", model_id),
                                ("layer_signature", "LAYER_SIGNATURE", layer_signature)):
        if metadata[key] != value:
            raise SAEFileError(f"the SAE was trained on {key} {metadata[key]!r} but {setting} is {value!r}. "
                               "Run stages 01-02 with these settings, or pass the ones the SAE used.")
    trained_for = metadata.get("target_signature")
    if trained_for != target:
        said = (f"a {metadata.get('train_target', 'transcoder')} predicting {trained_for!r}" if trained_for
                else "an SAE (TRAIN_TARGET='sae')")
        wanted = f"TRAIN_TARGET={metadata.get('train_target', 'transcoder')!r}" if trained_for else "TRAIN_TARGET='sae'"
        raise SAEFileError(f"the SAE is {said}, but the settings ask for "
                           f"{'target ' + repr(target) if target else 'an SAE'}: pass {wanted} (and the "
                           "TARGET_SIGNATURE it used), or run stages 01-02 with these settings.")


def check_sae_width(sae: TopKSAE, width: int, layer: str = "LAYER_SIGNATURE's layer") -> None:
    """Stop before an SAE reads activations of another width (an SAE_PATH made for another layer or
    model), which would fail deep inside a reshape or, worse, by chance not fail."""
    if sae.d_in != width:
        raise SAEFileError(f"the SAE reads {sae.d_in} dimensions but {layer} has {width}: set LAYER_SIGNATURE "
                           "(and MODEL_ID) to the layer the SAE was trained on, or SAE_PATH to an SAE for this layer")
