"""The parts of the pipeline that depend on the model's architecture, on tiny random models of each
architecture built from a config (no download): the layer listing, the forward stopped at the
layer, the SAE spliced in for the CE figures, and the final norm of the logit lens. Each runs on a
whole block's output (a tuple in most architectures) and on a norm inside the block."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import STORIES
from saekit.activations.models import LayerNotFoundError, final_norm, final_norm_gain, forward_to_layer, layer_names, resolve_layer
from saekit.evaluation.splice import splice_metrics

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _gpt2(vocab):
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _qwen2(vocab):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **SMALL))


def _gemma2(vocab):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, head_dim=8, sliding_window=16, **SMALL))


def _phi3(vocab):
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(vocab_size=vocab, **SMALL))


def _gpt_neox(vocab):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    config = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, **config))


def _llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **SMALL))


# architecture: (build, a block's output, a norm inside that block, the final norm, its gain from the weight)
ARCHITECTURES = {
    "gpt2": (_gpt2, "transformer.h.1", "transformer.h.1.ln_2", "transformer.ln_f", lambda w: w),
    "qwen2": (_qwen2, "model.layers.1", "model.layers.1.post_attention_layernorm", "model.norm", lambda w: w),
    "gemma2": (_gemma2, "model.layers.1", "model.layers.1.pre_feedforward_layernorm", "model.norm", lambda w: 1 + w),
    "phi3": (_phi3, "model.layers.1", "model.layers.1.post_attention_layernorm", "model.norm", lambda w: w),
    "llama": (_llama, "model.layers.1", "model.layers.1.post_attention_layernorm", "model.norm", lambda w: w),
    "gpt_neox": (_gpt_neox, "gpt_neox.layers.1", "gpt_neox.layers.1.post_attention_layernorm",
                 "gpt_neox.final_layer_norm", lambda w: w),
}
CASES = [(arch, which) for arch in ARCHITECTURES for which in ("block", "norm")]


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    built = {}
    for arch, (build, *_rest) in ARCHITECTURES.items():
        torch.manual_seed(0)
        model = build(len(tiny_tokenizer)).eval()
        with torch.no_grad():  # norms start at their identity gain: randomise them so that the gain shows
            for name, param in model.named_parameters():
                if "norm" in name or "ln_" in name:
                    param.uniform_(0.5, 1.5) if name.endswith("weight") else param.uniform_(-0.1, 0.1)
        built[arch] = model
    return built


def _signature(model, path: str) -> str:
    return next(sig for sig, p in layer_names(model).items() if p == path)


@pytest.mark.parametrize("arch,which", CASES)
def test_the_layer_is_listed_and_the_forward_stops_at_it(models, tiny_tokenizer, arch, which):
    model = models[arch]
    path = ARCHITECTURES[arch][1 if which == "block" else 2]
    signature = _signature(model, path)
    assert signature.startswith(type(model).__name__.lower() + "_")
    layer = resolve_layer(model, signature)
    enc = tiny_tokenizer(STORIES[:3], return_tensors="pt", padding=True)

    full: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: full.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False)
    handle.remove()
    got = forward_to_layer(model, layer, enc.input_ids, enc.attention_mask)
    assert got.shape == (*enc.input_ids.shape, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, full[0].float())

    # the rest of the model never ran: a later module's hook is not called
    later = model.get_output_embeddings()
    calls: list[int] = []
    handle = later.register_forward_hook(lambda *_: calls.append(1))
    forward_to_layer(model, layer, enc.input_ids, enc.attention_mask)
    handle.remove()
    assert not calls


@pytest.mark.parametrize("arch,which", CASES)
def test_the_ce_splice_replaces_the_layers_output(models, tiny_tokenizer, arch, which):
    model = models[arch]
    layer = resolve_layer(model, _signature(model, ARCHITECTURES[arch][1 if which == "block" else 2]))
    mean = torch.zeros(32)
    result = splice_metrics(model, tiny_tokenizer, layer, STORIES[:4], lambda h: h.clone(), mean, max_length=24,
                            batch_size=2, progress=False)
    # a perfect reconstruction changes nothing; zeroing the layer's output changes the loss (a little: the
    # random weights are small)
    assert result["ce_sae"] == pytest.approx(result["ce_clean"], abs=1e-5)
    assert result["kl_sae"] == pytest.approx(0, abs=1e-5)
    assert abs(result["ce_zero"] - result["ce_clean"]) > 1e-7 and result["kl_zero"] > 1e-7
    assert result["n_predictions"] > 0


@pytest.mark.parametrize("arch,which", CASES)
def test_the_fast_splice_gives_the_plain_splices_figures(models, tiny_tokenizer, arch, which, capsys):
    """The fast splice (the blocks below the layer run once per batch, the three variants above it as one
    batch, the head on real predictions only) against the whole model run for every variant, on an
    imperfect reconstruction. The same float32 arithmetic on the same inputs, but in matrix products of
    other shapes, so the two differ in float32 rounding, as much as the plain path differs from a float64
    reference (test_splice holds it to 1e-5 nats): a token's KL is the difference of two float32 sums
    the size of the entropy (~4.5 nats here, whose float32 spacing is 4.8e-7), so each text's KL sum may
    move by a few 1e-7 nats, the figures (means over every token) by less than 1e-7. Every figure, interval
    and per-text sum agrees within 1e-5 relative or those; CE recovered is a ratio of two CE gaps, here
    ~1e-2 nats between ~4.5-nat CEs, which magnifies the CEs' agreement ~500 times: within 1e-3 relative,
    it and its interval."""
    model = models[arch]
    layer = resolve_layer(model, _signature(model, ARCHITECTURES[arch][1 if which == "block" else 2]))
    mean = torch.linspace(-1, 1, 32)
    noisy = lambda h: h + 0.3 * torch.sin(h * 7)  # noqa: E731 - a deterministic imperfect reconstruction
    fast, plain = (splice_metrics(model, tiny_tokenizer, layer, STORIES, noisy, mean, max_length=24, batch_size=3,
                                  progress=False, keep_per_text=True, fast=use) for use in (True, False))
    assert "whole model" not in capsys.readouterr().out  # the fast path ran, with no fall-back
    assert fast["kl_sae"] > 1e-9 and fast["kl_zero"] > 1e-9  # the variants do differ from the clean pass
    for name, value in plain.items():
        if name != "per_text":
            np.testing.assert_allclose(fast[name], value, rtol=1e-3 if name.startswith("ce_recovered") else 1e-5,
                                       atol=1e-7, err_msg=name)
    for sums in ("nll", "kl"):
        for variant, values in getattr(plain["per_text"], sums).items():
            np.testing.assert_allclose(getattr(fast["per_text"], sums)[variant], values, rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_logit_lens_uses_the_architectures_final_norm(models, arch):
    model = models[arch]
    _build, _block, _norm, norm_path, gain_of = ARCHITECTURES[arch]
    assert final_norm(model) is model.get_submodule(norm_path)
    expected = gain_of(model.get_submodule(norm_path).weight.detach().float())
    torch.testing.assert_close(final_norm_gain(model), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(final_norm_gain(model), torch.ones(32))


def test_a_model_with_no_known_final_norm_is_refused(models):
    class Wrapped(torch.nn.Module):  # the same weights under module names the lens does not know
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

    with pytest.raises(LayerNotFoundError, match="no final norm found in Wrapped.*FINAL_NORM_PATHS"):
        final_norm_gain(Wrapped(models["qwen2"]))
