"""Will it fit? The memory a stage is about to take, estimated from the settings before anything is
allocated, against what the device has free, so that a setting too large for the machine ends in
one line naming it rather than an out-of-memory traceback (or the kernel's OOM killer) minutes in.

The estimates count the large tensors only and round up where the allocator might; they are meant
to catch a setting that is off by a factor, not to budget the last gigabyte.
"""
from __future__ import annotations

import os

import torch

from .errors import PipelineError

FLOAT32 = 4


class OutOfMemory(PipelineError, MemoryError):
    pass


def free_bytes(device: torch.device) -> int:
    """Memory free for this process: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check_fits(what: str, parts: dict[str, int], device: torch.device, advice: str) -> None:
    """An error when the parts add up to more than the device has free."""
    need, free = sum(parts.values()), free_bytes(device)
    if need > free:
        largest = ", ".join(f"{name} {_gb(n)}" for name, n in sorted(parts.items(), key=lambda p: -p[1]))
        where = "GPU" if device.type == "cuda" else "machine"
        raise OutOfMemory(f"{what} would need about {_gb(need)} ({largest}) but this {where} has {_gb(free)} free. "
                          f"{advice}")


def training_parts(d: int, n_latents: int, batch_size: int, initial_copy_here: bool) -> dict[str, int]:
    """Stage 02's large tensors besides its source's buffers and its kernels' (the trainer adds those:
    saekit.training.kernels.step_parts): the SAE with its gradients and Adam's two moments (and the
    copy of the initial weights kept for stage 03, on the host), a step's dense products over every
    latent (the encoder's pre-activations, their top-k and AuxK's), and the held-out evaluation's
    batches."""
    weights = (2 * n_latents * d + n_latents + d) * FLOAT32
    return {"the SAE, its gradients and Adam's state": 4 * weights + (2 * n_latents * d * FLOAT32 if initial_copy_here else 0),
            "a training step's products": 3 * batch_size * n_latents * FLOAT32 + 8 * batch_size * d * FLOAT32,
            "the held-out evaluation": 4096 * (n_latents + 4 * d) * FLOAT32}


def forward_parts(model, tokens: int, max_length: int) -> dict[str, int]:
    """A forward pass's largest activations for a batch of `tokens` tokens, padding included, of texts
    of at most max_length: the hidden states, the MLP's intermediate ones and the attention scores (no
    flash attention assumed; texts of length L hold tokens x L of them, at most tokens x max_length),
    in the model's dtype."""
    config = model.config
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), 0)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    intermediate = get("intermediate_size", "n_inner") or 4 * hidden
    heads = get("num_attention_heads", "n_head") or 1
    item = next(model.parameters()).element_size()
    return {"a forward batch's activations": (tokens * (6 * hidden + 2 * intermediate)
                                              + tokens * heads * max_length * 2) * item}
