"""The output side (saekit.concepts.output_side): measured where the layer is not the residual stream,
the direct lens where it is and holds, N/A otherwise; each kind checked against the measured effect
with the calibrated threshold HOLDS."""
import numpy as np
import pytest

from conftest import STORIES, TINY_LAYER, concept_sae
from saekit.activations.models import final_norm_gain, resolve_layer
from saekit.concepts.output_side import (DIRECT_LENS, HOLDS, MEASURED, NOT_AVAILABLE, is_residual_point,
                                         measured_effects, output_sides, top_overlap)

BLOCK_OUTPUT = "llamaforcausallm_model_layers_1"  # the residual stream after block 1


def _effects(model, tok, layer, sae, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    return measured_effects(model, layer, sae, list(range(sae.n_latents)), np.full(sae.n_latents, 4.0),
                            enc.input_ids, enc.attention_mask, rows_per_pass=256)


def _direct_lens(model, sae):
    logits = (sae.W_dec.detach().float() * final_norm_gain(model)) @ model.get_output_embeddings().weight.float().T
    return logits - logits.mean(0, keepdim=True)


def test_each_kind_of_output_side_agrees_with_the_measured_effect_where_it_is_shown(tiny_model, tiny_tokenizer):
    sae = concept_sae()
    resid, mlp_input = resolve_layer(tiny_model, BLOCK_OUTPUT), resolve_layer(tiny_model, TINY_LAYER)
    assert is_residual_point(tiny_model, resid) and not is_residual_point(tiny_model, mlp_input)
    assert is_residual_point(tiny_model, tiny_model.get_input_embeddings())
    # at the normalised MLP input the measured effect reproduces on other texts; the lens is at chance
    first, second = (_effects(tiny_model, tiny_tokenizer, mlp_input, sae, t) for t in (STORIES[:4], STORIES[4:8]))
    assert top_overlap(first, second) >= HOLDS > top_overlap(_direct_lens(tiny_model, sae), first)
    # at a residual-stream point the direct lens holds
    assert top_overlap(_direct_lens(tiny_model, sae), _effects(tiny_model, tiny_tokenizer, resid, sae, STORIES[:4])) \
        >= HOLDS

    live, measure = list(range(sae.n_latents)), [0, 1, 2]
    scales = {i: 4.0 for i in measure}
    sides, about = output_sides(tiny_model, tiny_tokenizer, mlp_input, sae, live, measure, scales, STORIES[:4], 8)
    assert {sides[i]["method"] for i in measure} == {MEASURED} and not about["residual_stream"]
    assert all(sides[i] == {"method": NOT_AVAILABLE, "promoted": [], "suppressed": []} for i in live[3:])
    vocab = [tiny_tokenizer.decode([t]) for t in range(len(tiny_tokenizer))]
    enc = tiny_tokenizer(STORIES[:4], return_tensors="pt", padding=True)
    effects = measured_effects(tiny_model, mlp_input, sae, measure, np.full(3, 4.0), enc.input_ids, enc.attention_mask)
    for j, i in enumerate(measure):  # the shown tokens are the measured effect's top and bottom ones
        assert [t for t, _ in sides[i]["promoted"]] == [vocab[t] for t in effects[j].topk(10).indices.tolist()]
        assert [t for t, _ in sides[i]["suppressed"]] == [vocab[t] for t in (-effects[j]).topk(10).indices.tolist()]
    sides, about = output_sides(tiny_model, tiny_tokenizer, resid, sae, live, measure, scales, STORIES[:4], 8)
    assert about["residual_stream"] and {sides[i]["method"] for i in live[3:]} == {DIRECT_LENS}
    lens = (sae.W_dec.detach().float() * final_norm_gain(tiny_model)) @ tiny_model.get_output_embeddings().weight.T
    for i in live[3:6]:
        top = lens[i].topk(10)
        assert [v for _, v in sides[i]["promoted"]] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert [t for t, _ in sides[i]["promoted"]] == [vocab[t] for t in top.indices.tolist()]
