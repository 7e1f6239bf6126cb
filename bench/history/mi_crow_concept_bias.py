"""Does editing only mi_crow's `concepts.multiplication` add +1 to every latent?

mi_crow's AutoencoderConcepts starts both `multiplication` and `bias` at ones, and
TopKSae.modify_activations applies `codes * multiplication + bias` as soon as either differs from
ones. So amplifying one concept the way its demo does (multiplication[i] = factor) would also add
1 to all n_latents codes, i.e. add the sum of every decoder row to the reconstruction.

This runs mi_crow's own TopKSae hook on random inputs (no model, no download) and measures it
against the intended codes * multiplication. Seconds on a CPU:

    .venv/bin/python bench/history/mi_crow_concept_bias.py
"""
import torch
from mi_crow.mechanistic.sae.modules.topk_sae import TopKSae

N_INPUTS, N_LATENTS, K, TOKENS, LATENT, FACTOR = 64, 256, 8, 32, 3, 2.0

torch.manual_seed(0)
sae = TopKSae(n_latents=N_LATENTS, n_inputs=N_INPUTS)
sae.sae_engine = sae._initialize_sae_engine(k=K)  # what TopKSae.train does with its config's k
x = torch.randn(TOKENS, N_INPUTS)


@torch.no_grad()
def hooked(x: torch.Tensor) -> torch.Tensor:
    """The layer output mi_crow's forward hook returns for x."""
    return sae.modify_activations(None, None, x)


with torch.no_grad():
    _, codes = sae.sae_engine.encode(x)
    plain = sae.decode(codes)
    untouched = hooked(x)
    print(f"defaults (multiplication = bias = 1): max |hook - plain splice| = {(untouched - plain).abs().max():.1e}")

    sae.concepts.multiplication.data[LATENT] = FACTOR  # the demo's edit
    intended = sae.decode(codes * sae.concepts.multiplication)
    steered = hooked(x)
    edited = codes * sae.concepts.multiplication + sae.concepts.bias
    relative = (steered - intended).norm(dim=1).mean() / intended.norm(dim=1).mean()
    print(f"multiplication[{LATENT}] = {FACTOR}, bias left at its default ones:")
    print(f"  active latents per token: {int((codes != 0).sum(1).max())} before, "
          f"{int((edited != 0).sum(1).min())} after (of {N_LATENTS})")
    print(f"  max |hook - decode(codes * multiplication)| = {(steered - intended).abs().max():.4f}; "
          f"mean ||hook - intended|| / mean ||intended|| = {relative:.2f}")
    print(f"  hook - intended == sum of all decoder rows: "
          f"{torch.allclose(steered - intended, sae.decode(torch.ones(1, N_LATENTS)).expand_as(x), atol=1e-5)}")

    sae.concepts.multiplication.data[LATENT] = 1.0
    sae.concepts.bias.data[LATENT] = 0.0  # any edit to bias, too, switches the formula on
    shifted = hooked(x)
    print(f"bias[{LATENT}] = 0 alone: max |hook - plain splice| = {(shifted - plain).abs().max():.4f} "
          "(every other latent gets +1)")

    sae.concepts.bias.data.zero_()
    sae.concepts.multiplication.data[LATENT] = FACTOR
    print(f"bias = 0 everywhere (the fix): hook == decode(codes * multiplication): "
          f"{torch.allclose(hooked(x), intended, atol=1e-6)}")
