"""Steering: amplify latents of the SAE spliced into the model, and generate.

As in mi_crow's demo, the layer's output is replaced by the SAE's reconstruction with some latents'
TopK values multiplied by a factor: decode(values * amplification[indices], indices). The TopK
selection itself is left alone, so a factor only acts where its latent is among the k active ones,
a factor of 0 removes the latent, and all factors at 1 give exactly the plain splice (x * 1.0 == x
in floating point). mi_crow instead applies codes * multiplication + bias with a bias that starts
at ones, which adds every decoder row once multiplication is edited (bench/history/mi_crow_concept_bias.py).

Generation is greedy, so the baseline and steered continuations differ only by the intervention.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..activations.models import forward_to_layer, replaced_output
from ..concepts.output_side import is_residual_point
from ..evaluation.splice import InputCapture
from ..training.sae import TopKSAE


def reach(model: nn.Module, layer: nn.Module, signature: str, target: str | None = None) -> str:
    """Where steering at `layer` acts: the residual stream, or only through the block that reads the
    layer's output (post_attention_layernorm: the block's normalised MLP input, which only its MLP reads).
    A transcoder (`target`: what it replaces) steers that module's output."""
    if target is not None:
        return (f"the transcoder replaces {target}, reading {signature}: steering changes what it writes in that "
                "module's place (an MLP's output goes into the residual stream, so every later block sees it).")
    if is_residual_point(model, layer):
        return f"{signature} is the residual stream: steering there reaches every later block."
    if signature.endswith("post_attention_layernorm"):
        return (f"{signature} is a block's normalised MLP input, not the residual stream: steering here acts only "
                "through that block's MLP.")
    return (f"{signature} is not the residual stream: steering here acts only through the module that reads its "
            "output.")


def amplification(n_latents: int, factors: Mapping[int, float]) -> torch.Tensor:
    """A factor per latent: ones, with the given latents' factors."""
    amp = torch.ones(n_latents)
    for index, factor in factors.items():
        amp[index] = factor
    return amp


def steered_reconstruction(sae: TopKSAE, amp: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer replacement: the SAE's reconstruction with each active value times its latent's factor."""

    def replace(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, sae.d_in)
        values, indices = sae.encode(flat)
        scaled = values * amp.to(values.device, values.dtype)[indices]
        return (sae.decode(scaled, indices) + sae.skip_term(flat)).reshape(*hidden.shape[:-1], sae.d_out)

    return replace


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, layer: nn.Module | None = None,
             replace: Callable[[torch.Tensor], torch.Tensor] | None = None, target: nn.Module | None = None) -> str:
    """Greedy continuation of `prompt`, with the layer's output replaced when `replace` is given; with a
    transcoder's `target`, the target's output is replaced by replace(the layer's output)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    # an explicit config: the model's own may ask for sampling (temperature, top_p)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              bos_token_id=model.generation_config.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with ExitStack() as stack:
        if replace is not None and target is not None:
            capture = stack.enter_context(InputCapture(layer))
            stack.enter_context(replaced_output(target, capture.predicting(replace)))
        elif replace is not None:
            stack.enter_context(replaced_output(layer, replace))
        out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, generation_config=config)
    return tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def active_latents(model: nn.Module, tokenizer, layer: nn.Module, sae: TopKSAE, prompt: str) -> list[tuple[int, float]]:
    """(latent, value) of the k latents active on the prompt's last token, highest first: the ones a
    factor acts on from the first generated token (elsewhere in the prompt it reaches the next token
    only through later layers' attention)."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    hidden = forward_to_layer(model, layer, enc.input_ids, enc.attention_mask)
    values, indices = sae.encode(hidden[0, -1:])
    order = values[0].argsort(descending=True)
    return [(int(indices[0, j]), float(values[0, j])) for j in order if values[0, j] > 0]


@dataclass
class Steering:
    """Continuations of one prompt: clean model, SAE spliced, and the latent amplified by each factor."""

    prompt: str
    latent: int
    baseline: str
    spliced: str
    steered: dict[float, str]

    def table(self) -> dict[str, str]:
        """Column title -> continuation, in reading order."""
        return {"clean model": self.baseline, "SAE spliced": self.spliced,
                **{f"latent {self.latent} × {factor:g}": text for factor, text in self.steered.items()}}


def steer(model: nn.Module, tokenizer, layer: nn.Module, sae: TopKSAE, prompt: str, latent: int,
          factors: Sequence[float] = (0.0, 2.0, 5.0), max_new_tokens: int = 24,
          target: nn.Module | None = None) -> Steering:
    """Generate from `prompt` without the SAE, with it, and with `latent` amplified by each factor; a
    transcoder is spliced in place of its `target`."""
    run = lambda replace: generate(model, tokenizer, prompt, max_new_tokens, layer, replace, target)  # noqa: E731
    steered = {factor: run(steered_reconstruction(sae, amplification(sae.n_latents, {latent: factor})))
               for factor in factors}
    return Steering(prompt, latent, run(None), run(sae), steered)
