"""Stage 04, output side: which next tokens a latent makes likelier or less likely, measured where no
shortcut is true.

Where the SAE reads the residual stream (a block's output, or the token embeddings), the latent's
decoder row is written into it, and the direct (logit) lens, W_dec x final-norm gain through the
unembedding, is its first-order effect on the logits; the later blocks may bend it, so its agreement
with the measured effect is measured (bench/bench_output_side.py, observations.md). Anywhere else (the
default post_attention_layernorm: the block's normalised MLP input, gain x x / rms) the row never
enters the residual stream: it reaches the logits only through that block's MLP, and the lens says
nothing about it (on the demo its top 10 tokens shared 0 of 10 with the measured effect for each of
the 12 most frequent latents).

The measured effect of a latent: its decoder row times its largest activation on stage 04's texts is
added to the layer's output at every position of a few held-out texts; the change in each next-token
log-probability is averaged over their positions; the change common to every measured latent (the
mean of theirs: adding any large vector moves some tokens alike) is taken away. Its top and bottom
tokens are the latent's output side. It costs a forward pass of the texts per latent, so stage 04
measures the OUTPUT_EFFECT_LATENTS most frequent live latents (the ones its tables and the naming
show first); the others show the direct lens at a residual-stream point, and "N/A" elsewhere.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..activations.models import replaced_output
from ..training.sae import TopKSAE
from .labels import logit_lens

MEASURED, DIRECT_LENS, NOT_AVAILABLE = "measured", "direct lens", "N/A"
# Tokens of each text the effect is measured on: the change in next-token log-probabilities settles
# within a few dozen positions, and the cost (a forward pass per latent) grows with every token.
EFFECT_MAX_TOKENS = 64
# An output side "holds" where its top 10 tokens share at least this share with the measured effect on
# other texts. Calibrated on the tests' tiny model (94 tokens, so chance is ~0.1): the measured effect
# at a block's normalised MLP input reproduces at 0.66-0.79 across disjoint texts, the direct lens at
# residual-stream points agrees at 0.91-1.0, and the lens at the normalised MLP input at 0.11 (chance).
HOLDS = 0.5


def is_residual_point(model: nn.Module, layer: nn.Module) -> bool:
    """Whether the layer's output is the residual stream: a block of the model's list of blocks (its
    output is the stream after it), or the token embeddings (the stream before the first block)."""
    if layer is model.get_input_embeddings():
        return True
    return any(layer is block for blocks in model.modules() if isinstance(blocks, nn.ModuleList) for block in blocks)


def writes_residual(model: nn.Module, layer: nn.Module) -> bool:
    """Whether a vector added to the layer's output enters the residual stream as it is: the stream itself
    (`is_residual_point`), or a block's MLP, whose output the block adds to the stream (where a transcoder
    writes: its decoder rows are then read by the direct lens as a residual-stream SAE's are)."""
    return is_residual_point(model, layer) or any(
        layer is getattr(block, "mlp", None) for blocks in model.modules() if isinstance(blocks, nn.ModuleList)
        for block in blocks)


@torch.no_grad()
def measured_effects(model: nn.Module, layer: nn.Module, sae: TopKSAE, latents: list[int], scales: np.ndarray,
                     input_ids: torch.Tensor, attention_mask: torch.Tensor, rows_per_pass: int = 16) -> torch.Tensor:
    """[len(latents), vocab] each latent's mean change in next-token log-probabilities over the real
    positions of the texts (input_ids [texts, seq]) when W_dec[latent] x scales[i] is added to the
    layer's output, less the mean change of all of them."""
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    mask = attention_mask.float()
    n_texts = len(input_ids)

    def log_probs(ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(input_ids=ids, attention_mask=att, use_cache=False).logits.float(), -1)

    base = log_probs(input_ids, attention_mask)
    per_pass = max(1, rows_per_pass // n_texts)  # latents a forward pass takes, each with all the texts
    changes = []
    for lo in range(0, len(latents), per_pass):
        chunk = latents[lo:lo + per_pass]
        vectors = sae.W_dec[chunk].float().to(device) * torch.as_tensor(scales[lo:lo + len(chunk)], dtype=torch.float32,
                                                                      device=device).unsqueeze(1)
        added = vectors.repeat_interleave(n_texts, 0).unsqueeze(1)  # [chunk x texts, 1, d]: every position
        with replaced_output(layer, lambda out: out + added):
            steered = log_probs(input_ids.repeat(len(chunk), 1), attention_mask.repeat(len(chunk), 1))
        steered = steered.view(len(chunk), *base.shape)
        changes.append(((steered - base) * mask.unsqueeze(-1)).sum((1, 2)) / mask.sum())
    effects = torch.cat(changes).cpu()
    return effects - effects.mean(0, keepdim=True)


def _top_pairs(values: torch.Tensor, decoded: dict[int, str], top: int) -> dict[str, list]:
    up, down = values.topk(top), (-values).topk(top)
    return {"promoted": [[decoded[int(t)], round(float(v), 3)] for t, v in zip(up.indices, up.values)],
            "suppressed": [[decoded[int(t)], round(float(-v), 3)] for t, v in zip(down.indices, down.values)]}


def output_sides(model: nn.Module, tokenizer, layer: nn.Module, sae: TopKSAE, live: list[int], measure: list[int],
                 scales: dict[int, float], texts: list[str], rows_per_pass: int,
                 top: int = 10) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """(per live latent its output side, what the meta says about them): measured for the latents in
    `measure` (`scales`: their largest activations) over `texts`, the direct lens for the others at a
    residual-stream point, N/A elsewhere. Each side is {method, promoted, suppressed}, the two lists
    empty for N/A."""
    residual = writes_residual(model, layer)
    sides: dict[int, dict[str, Any]] = {}
    if measure and texts:
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=EFFECT_MAX_TOKENS)
        effects = measured_effects(model, layer, sae, measure, np.array([scales[i] for i in measure]), enc.input_ids,
                                   enc.attention_mask, rows_per_pass)
        ranked = torch.cat([effects.topk(top, 1).indices, (-effects).topk(top, 1).indices], 1)
        decoded = {int(t): tokenizer.decode([int(t)]) for t in ranked.unique()}
        sides = {i: {"method": MEASURED, **_top_pairs(effects[j], decoded, top)} for j, i in enumerate(measure)}
    rest = [i for i in live if i not in sides]
    if residual and rest:
        promoted_ids, promoted_vals, suppressed_ids, suppressed_vals = logit_lens(model, sae, top)
        decoded = {int(t): tokenizer.decode([int(t)])
                   for t in torch.cat([promoted_ids[rest], suppressed_ids[rest]]).unique()}
        for i in rest:
            sides[i] = {"method": DIRECT_LENS,
                        "promoted": [[decoded[int(t)], round(float(v), 3)]
                                     for t, v in zip(promoted_ids[i], promoted_vals[i])],
                        "suppressed": [[decoded[int(t)], round(float(v), 3)]
                                       for t, v in zip(suppressed_ids[i], suppressed_vals[i])]}
    for i in rest:
        sides.setdefault(i, {"method": NOT_AVAILABLE, "promoted": [], "suppressed": []})
    about = {"residual_stream": residual, "measured_latents": len(measure), "measured_on_texts": len(texts),
             "measured_tokens_per_text": EFFECT_MAX_TOKENS,
             "how": ("decoder row x max activation added at the layer's output at every position; mean change in "
                     "next-token log-probabilities, less the mean change of all measured latents"),
             "others": DIRECT_LENS if residual else
             f"{NOT_AVAILABLE}: the layer is not the residual stream, so the direct lens does not hold"}
    return sides, about


def top_overlap(a: torch.Tensor, b: torch.Tensor, top: int = 10) -> float:
    """Mean over rows of the share of `a`'s top `top` columns that are among `b`'s."""
    ta, tb = a.topk(top, 1).indices, b.topk(top, 1).indices
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / top for x, y in zip(ta, tb)]))
