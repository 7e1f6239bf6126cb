"""Steering through the spliced SAE on the tiny model: factor 1 is the plain splice, 0 removes a latent."""
import pytest
import torch

from conftest import TINY_LAYER
from saekit.activations.models import replaced_output, resolve_layer
from saekit.show.steering import active_latents, amplification, generate, reach, steer, steered_reconstruction

PROMPT = "Once upon a time there was a little"


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_tokenizer):
    from saekit.training.sae import TopKSAE

    d = tiny_model.config.hidden_size
    sae = TopKSAE(d, 4 * d, 4)
    sae.init_weights(torch.zeros(d), torch.Generator().manual_seed(0))
    layer = resolve_layer(tiny_model, TINY_LAYER)
    latent = active_latents(tiny_model, tiny_tokenizer, layer, sae.eval(), PROMPT)[0][0]
    return tiny_model, tiny_tokenizer, layer, sae, latent


def _logits(model, tokenizer, layer, replace):
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad(), replaced_output(layer, replace):
        return model(ids).logits


def test_factor_one_is_exactly_the_plain_splice(setup):
    model, tok, layer, sae, latent = setup
    ones = steered_reconstruction(sae, amplification(sae.n_latents, {}))
    assert torch.equal(_logits(model, tok, layer, ones), _logits(model, tok, layer, sae))
    result = steer(model, tok, layer, sae, PROMPT, latent, factors=(1.0, 50.0), max_new_tokens=12)
    assert result.steered[1.0] == result.spliced
    assert result.steered[50.0] != result.spliced  # a latent active on the last prompt token steers
    assert list(result.table()) == ["clean model", "SAE spliced", f"latent {latent} × 1", f"latent {latent} × 50"]


def test_factor_zero_removes_the_latent(setup):
    model, tok, layer, sae, latent = setup

    def without_latent(hidden):
        values, indices = sae.encode(hidden.reshape(-1, sae.d_in))
        return sae.decode(values.masked_fill(indices == latent, 0), indices).reshape(hidden.shape)

    zero = steered_reconstruction(sae, amplification(sae.n_latents, {latent: 0.0}))
    assert torch.equal(_logits(model, tok, layer, zero), _logits(model, tok, layer, without_latent))
    assert not torch.equal(_logits(model, tok, layer, zero), _logits(model, tok, layer, sae))
    assert generate(model, tok, PROMPT, 12, layer, zero) == generate(model, tok, PROMPT, 12, layer, without_latent)


def test_active_latents_are_the_last_tokens_top_k(setup):
    model, tok, layer, sae, _ = setup
    found = active_latents(model, tok, layer, sae, PROMPT)
    assert len(found) == sae.k and all(v > 0 for _, v in found)
    assert [v for _, v in found] == sorted((v for _, v in found), reverse=True)


def test_steering_says_whether_it_reaches_the_residual_stream(tiny_model):
    mlp_input = reach(tiny_model, resolve_layer(tiny_model, TINY_LAYER), TINY_LAYER)
    assert "acts only through that block's MLP" in mlp_input and "not the residual stream" in mlp_input
    block = "llamaforcausallm_model_layers_1"
    assert "is the residual stream" in reach(tiny_model, resolve_layer(tiny_model, block), block)
