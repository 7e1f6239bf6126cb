"""The products a training step makes through its active latents, in two kinds (KERNELS):

- "sparse": through the chosen latents' rows only. On a CPU, sparse products (SDDMM, sparse x dense),
  which build no [m, d] tensor of gathered rows: 2x (row gradients) and 5x (row dot products) faster
  than gather + index_add_ at the demo's size (observations.md). Elsewhere they gather the rows and
  index_add_ them, which a GPU does with fp32 atomics: memory traffic grows with k (estimated in issue
  33 at ~0.35 GB per unit of k a step at d = 1,536, batch 4,096; not yet measured), and the sums are added in no fixed order.
- "dense": the codes scattered into a dense [batch, n_latents] matrix and multiplied by dense
  products (TF32 on a CUDA GPU where TF32 is allowed): the cost does not depend on k, and there are no
  atomics, so a GPU adds up in a fixed order.

"auto" (`resolve_kernels`) takes dense on a CUDA GPU and sparse elsewhere. Both give the same values
and gradients up to float32 rounding (tests/test_sae.py: within rtol 1e-4).

Codes are passed as `Codes`, compressed sparse rows: a row may hold any number of active latents
(BatchTopK's rows do), and a batch's m codes take O(m) memory whatever their spread over rows.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

def resolve_kernels(setting: str, device: torch.device) -> str:
    """KERNELS: "auto" is dense on a CUDA GPU (k-independent cost, no atomics) and sparse elsewhere
    (measured faster on a CPU, observations.md)."""
    if setting != "auto":
        return setting
    return "dense" if torch.device(device).type == "cuda" else "sparse"


FLOAT32 = 4


def step_parts(d: int, n_latents: int, batch: int, k: int, *, batch_top: bool, candidates: int, kind: str,
               device: torch.device) -> dict[str, int]:
    """The largest tensors a training step makes through its codes, in bytes, beyond the encoder's
    product (saekit.base.memory.training_parts counts that): for saekit.base.memory's check.

    - `batch_top` (BatchTopK): the ReLU'd pre-activations flattened, and a full-size index buffer, as a
      sort-based top-k over them takes where k x batch is large (CUDA), plus the chosen codes' positions.
    - dense kernels: the scattered codes, a [batch, n_latents] float32 matrix, alive in the backward
      beside AuxK's saved products (measured on a CPU: with the encoder's product, which is gone by
      then, the step's products cover them; this is margin for a GPU allocator's rounding).
    - sparse kernels off the CPU: the gathered rows, [m, d] with m = `candidates` x batch (TopK's k,
      or the 2k candidates a bfloat16 proposal re-scores): one such tensor where every row has the
      same number of codes, two where rows differ (BatchTopK: the rows and the latents gathered side by
      side). At d = 1,536, batch 4,096 and 2k = 128: 3.2 GB. A CPU's sparse products gather none."""
    parts = {}
    if batch_top:
        parts["BatchTopK's batch top"] = batch * n_latents * (FLOAT32 + 8) + 48 * k * batch
    if kind == "dense":
        parts["the dense kernels' [batch, n_latents] matrices"] = batch * n_latents * FLOAT32
    elif torch.device(device).type != "cpu":
        parts["a training step's gathered rows"] = (2 if batch_top else 1) * candidates * batch * d * FLOAT32
    return parts


@contextmanager
def tf32(allowed: bool, device: torch.device) -> Iterator[None]:
    """TF32 (TF32 setting) for float32 products on a CUDA GPU inside the block, as before after it.
    TF32 rounds each product's inputs to 10 mantissa bits; the weights, Adam's state and the sums
    stay float32. A CPU has no TF32: nothing changes there."""
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@dataclass(frozen=True)
class Codes:
    """A batch's active latents: entries offsets[b]:offsets[b + 1] are row b's, in row order.
    `values`, `latents` and `rows` are [m]; `offsets` is [batch + 1]."""

    values: torch.Tensor
    latents: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor
    width: int | None = None  # the number of codes in every row, where it is the same (TopK's k)

    @property
    def batch(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def per_row(cls, values: torch.Tensor, indices: torch.Tensor) -> "Codes":
        """The same number of codes in every row: (values, indices) [batch, width]."""
        batch, width = indices.shape
        device = indices.device
        return cls(values.reshape(-1), indices.reshape(-1),
                   torch.arange(batch, device=device).repeat_interleave(width),
                   torch.arange(batch + 1, device=device) * width, width)

    @classmethod
    def from_flat(cls, values: torch.Tensor, flat: torch.Tensor, batch: int, n_latents: int) -> "Codes":
        """Codes at positions `flat` (ascending) of a [batch, n_latents] matrix. Nothing is read back to
        the host: the row boundaries are found on the device."""
        rows = flat // n_latents
        offsets = torch.searchsorted(rows, torch.arange(batch + 1, device=flat.device))
        return cls(values, flat - rows * n_latents, rows, offsets)

    def with_values(self, values: torch.Tensor) -> "Codes":
        return Codes(values, self.latents, self.rows, self.offsets, self.width)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) [batch, width], width the busiest row's, zero-valued where a row has fewer
        (reads the width back to the host)."""
        counts = self.offsets.diff()
        width = max(int(counts.max()) if self.batch else 0, 1)
        slot = torch.arange(len(self.rows), device=self.rows.device) - self.offsets[self.rows]
        values = self.values.new_zeros(self.batch, width).index_put_((self.rows, slot), self.values)
        indices = self.latents.new_zeros(self.batch, width).index_put_((self.rows, slot), self.latents)
        return values, indices


def _sparse_products(t: torch.Tensor) -> bool:
    """Sparse products where they were measured faster (CPU); gathers and index_add_ elsewhere."""
    return t.device.type == "cpu"


def dense(codes: Codes, weights: torch.Tensor, n_latents: int) -> torch.Tensor:
    """weights scattered at the codes' places of a [batch, n_latents] matrix (zeros elsewhere)."""
    out = weights.new_zeros(codes.batch * n_latents)
    out[codes.rows * n_latents + codes.latents] = weights
    return out.view(codes.batch, n_latents)


def weighted_row_sums(codes: Codes, weights: torch.Tensor, table: torch.Tensor, kind: str) -> torch.Tensor:
    """out[b] = sum over row b's codes e of weights[e] * table[latents[e]]: [batch, d]."""
    if kind == "dense":
        return dense(codes, weights, len(table)) @ table
    return F.embedding_bag(codes.latents, table, codes.offsets, mode="sum", per_sample_weights=weights,
                           include_last_offset=True)


def row_dots(codes: Codes, table: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """out[e] = <x[rows[e]], table[latents[e]]>: [m]. On a CPU a sampled product (SDDMM), 5x faster
    than gathering the rows first."""
    if kind == "dense":
        return (x @ table.T).flatten()[codes.rows * len(table) + codes.latents]
    if _sparse_products(x):
        with warnings.catch_warnings():  # torch calls CSR tensors beta; this product is tested against the gather
            warnings.simplefilter("ignore")
            pattern = torch.sparse_csr_tensor(codes.offsets, codes.latents, x.new_zeros(len(codes.latents)),
                                              (codes.batch, len(table)), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, x, table.T, beta=0.0).values()
    if codes.width is not None:  # one [m, d] tensor of gathered rows
        gathered = table.index_select(0, codes.latents).view(codes.batch, codes.width, -1)
        return torch.bmm(gathered, x.unsqueeze(2)).view(-1)
    return torch.bmm(table.index_select(0, codes.latents).unsqueeze(1), x.index_select(0, codes.rows).unsqueeze(2)).view(-1)


def row_gradients(codes: Codes, weights: torch.Tensor, x: torch.Tensor, n_latents: int, kind: str) -> torch.Tensor:
    """grad[i] = sum over codes e with latents[e] = i of weights[e] * x[rows[e]]: [n_latents, d]."""
    if kind == "dense":
        return dense(codes, weights, n_latents).T @ x
    if _sparse_products(x):  # indices < n_latents by construction
        sparse = torch.sparse_coo_tensor(torch.stack([codes.latents, codes.rows]), weights, (n_latents, codes.batch),
                                         check_invariants=False)
        return torch.sparse.mm(sparse, x)
    if codes.width is not None:  # one [m, d] tensor of weighted rows
        weighted = (weights.view(codes.batch, codes.width, 1) * x.unsqueeze(1)).flatten(0, 1)
    else:
        weighted = weights.unsqueeze(1) * x.index_select(0, codes.rows)
    return x.new_zeros(n_latents, x.shape[1]).index_add_(0, codes.latents, weighted)


class ChosenPreactivations(torch.autograd.Function):
    """`values` = pre[b, latents[e]] at the codes' places, where pre = (x - b_dec) W_enc^T + b_enc, computed
    without autograd by the product that chose the latents; made differentiable here.

    Backward reaches only the chosen rows of W_enc and b_enc (sparse), or multiplies the dense
    [batch, n] gradient (dense)."""

    @staticmethod
    def forward(ctx, x_centred, weight, bias, values, latents, rows, offsets, width, kind):
        ctx.save_for_backward(x_centred, weight, latents, rows, offsets)
        ctx.width, ctx.kind = width, kind
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x_centred, weight, latents, rows, offsets = ctx.saved_tensors
        codes, n, rest = Codes(grad, latents, rows, offsets, ctx.width), len(weight), (None,) * 6
        if ctx.kind == "dense":  # one scattered matrix for the three products; the bias's is a column sum, in a fixed order
            scattered = dense(codes, grad, n)
            grad_x = scattered @ weight if ctx.needs_input_grad[0] else None
            return grad_x, scattered.T @ x_centred, scattered.sum(0), *rest
        grad_x = weighted_row_sums(codes, grad, weight, "sparse") if ctx.needs_input_grad[0] else None
        return (grad_x, row_gradients(codes, grad, x_centred, n, "sparse"), grad.new_zeros(n).index_add_(0, latents, grad),
                *rest)


class Decode(torch.autograd.Function):
    """out[b] = sum over row b's codes e of values[e] * W[latents[e]]"""

    @staticmethod
    def forward(ctx, values, latents, rows, offsets, width, weight, kind):
        codes = Codes(values, latents, rows, offsets, width)
        ctx.save_for_backward(values, latents, rows, offsets, weight)
        ctx.width, ctx.kind = width, kind
        return weighted_row_sums(codes, values, weight, kind)

    @staticmethod
    def backward(ctx, grad):
        values, latents, rows, offsets, weight = ctx.saved_tensors
        codes, kind = Codes(values, latents, rows, offsets, ctx.width), ctx.kind
        return (row_dots(codes, weight, grad, kind), None, None, None, None,
                row_gradients(codes, values, grad, len(weight), kind), None)


def decode(codes: Codes, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The codes' weighted sum of `weight`'s rows, differentiable in the values and the weight: [batch, d]."""
    return Decode.apply(codes.values, codes.latents, codes.rows, codes.offsets, codes.width, weight, kind)


def chosen(codes: Codes, x_centred: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kind: str) -> torch.Tensor:
    """The codes' values (pre-activations computed outside autograd), differentiable through the
    encoder's rows: [m]."""
    return ChosenPreactivations.apply(x_centred, weight, bias, codes.values, codes.latents, codes.rows, codes.offsets,
                                      codes.width, kind)
