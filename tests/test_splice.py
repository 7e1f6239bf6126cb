import numpy as np
import pytest
import torch

from conftest import STORIES, TINY_LAYER
from saekit.activations.models import resolve_layer
from saekit.evaluation.splice import splice_metrics


def _run(model, tok, reconstruct, mean=None):
    layer = resolve_layer(model, TINY_LAYER)
    mean = torch.zeros(model.config.hidden_size) + 0.1 if mean is None else mean
    return splice_metrics(model, tok, layer, STORIES, reconstruct, mean, max_length=16, batch_size=3, progress=False)


def test_a_perfect_reconstruction_recovers_everything(tiny_model, tiny_tokenizer):
    m = _run(tiny_model, tiny_tokenizer, lambda h: h)
    assert m["ce_sae"] == m["ce_clean"] and m["delta_ce"] == 0
    assert m["ce_recovered_vs_zero"] == 1 and m["ce_recovered_vs_mean"] == 1
    assert abs(m["kl_sae"]) < 1e-6 and m["kl_zero"] > 0


def test_replacing_with_zeros_matches_zero_ablation(tiny_model, tiny_tokenizer):
    m = _run(tiny_model, tiny_tokenizer, torch.zeros_like)
    assert abs(m["ce_sae"] - m["ce_zero"]) < 1e-9 and m["ce_recovered_vs_zero"] == 0
    assert abs(m["kl_sae"] - m["kl_zero"]) < 1e-9


def test_every_variant_agrees_with_a_float64_reference(tiny_model, tiny_tokenizer):
    """CE and KL of the SAE, zero ablation and mean ablation, each recomputed one text at a time (no padding) in
    float64 with its own hook, and CE recovered from those figures by its definition."""
    noisy = lambda h: h + 0.3 * torch.sin(h * 7)  # noqa: E731 - a deterministic imperfect reconstruction
    mean = 5 * torch.randn(tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    m = _run(tiny_model, tiny_tokenizer, noisy, mean)
    layer = resolve_layer(tiny_model, TINY_LAYER)
    replacements = {"sae": noisy, "zero": torch.zeros_like, "mean": lambda h: mean.expand_as(h).to(h.dtype)}
    nll = dict.fromkeys(["clean", *replacements], 0.0)
    kl, count = dict.fromkeys(replacements, 0.0), 0
    for text in STORIES:
        ids = tiny_tokenizer(text, return_tensors="pt", truncation=True, max_length=16).input_ids
        targets = ids[0, 1:]
        with torch.no_grad():
            clean = torch.log_softmax(tiny_model(ids).logits[0, :-1].double(), -1)
            nll["clean"] -= float(clean[torch.arange(len(targets)), targets].sum())
            for name, replace in replacements.items():
                handle = layer.register_forward_hook(lambda mod, i, o, replace=replace: replace(o))
                spliced = torch.log_softmax(tiny_model(ids).logits[0, :-1].double(), -1)
                handle.remove()
                nll[name] -= float(spliced[torch.arange(len(targets)), targets].sum())
                kl[name] += float((clean.exp() * (clean - spliced)).sum())
        count += len(targets)
    assert m["n_predictions"] == count
    ce = {name: total / count for name, total in nll.items()}
    for name in nll:
        assert abs(m[f"ce_{name}"] - ce[name]) < 1e-5, name
    for name in replacements:
        assert abs(m[f"kl_{name}"] - kl[name] / count) < 1e-5, name
    assert abs(m["delta_ce"] - (ce["sae"] - ce["clean"])) < 1e-5 and m["delta_ce"] > 0
    for ablation in ("zero", "mean"):  # by its definition, on the CE figures just checked (a ratio of small gaps
        # here, so recomputing it from the reference's CEs would magnify their 1e-6 round-off)
        expected = (m[f"ce_{ablation}"] - m["ce_sae"]) / (m[f"ce_{ablation}"] - m["ce_clean"])
        assert abs(m[f"ce_recovered_vs_{ablation}"] - expected) < 1e-9, ablation
    assert abs(ce["mean"] - ce["zero"]) > 1e-3 and abs(kl["mean"] - kl["zero"]) > 1e-3 * count  # the two ablations differ here, so neither can pass for the other


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_stage_03_judges_the_sae_in_model_dtype_and_records_it(smoke_args, dtype):
    """One rule for every stage: stage 03 loads the model in MODEL_DTYPE, as stages 01, 02 on the fly
    and 04 do, and analysis.json's splice figures say which dtype they were measured in."""
    from saekit.base.settings import load_settings
    from saekit.evaluation.analysis import load_layer_model, load_trained_sae, splice_report

    settings = load_settings(smoke_args + [f"--MODEL_DTYPE={dtype}"])
    loaded = load_layer_model(settings)
    assert next(loaded.model.parameters()).dtype == getattr(torch, dtype)
    report = splice_report(settings, load_trained_sae(settings), progress=False, loaded=loaded)
    assert report["model_dtype"] == dtype and report["delta_ce"] == report["delta_ce"]  # measured, not NaN


def _per_text_reference(model, tok, reconstruct):
    """Each story's summed NLL, clean and spliced, and its predictions, one story at a time (no padding)."""
    layer = resolve_layer(model, TINY_LAYER)
    rows = []
    for text in STORIES:
        ids = tok(text, return_tensors="pt", truncation=True, max_length=16).input_ids
        with torch.no_grad():
            clean = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            handle = layer.register_forward_hook(lambda mod, i, o: reconstruct(o))
            spliced = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            handle.remove()
        picked = torch.arange(len(ids[0]) - 1), ids[0, 1:]
        rows.append((-float(clean[picked].sum()), -float(spliced[picked].sum()), len(ids[0]) - 1))
    return np.array(rows)


def test_every_delta_ce_kl_and_ce_recovered_has_a_bootstrap_interval_over_texts(tiny_model, tiny_tokenizer):
    from saekit.evaluation.splice import bootstrap_texts

    noisy = lambda h: h + 0.3 * torch.sin(h * 7)  # noqa: E731
    m = _run(tiny_model, tiny_tokenizer, noisy)
    for figure in ("delta_ce", "kl_sae", "kl_zero", "kl_mean", "ce_recovered_vs_zero", "ce_recovered_vs_mean"):
        low, high = m[f"{figure}_ci95"]
        assert low < m[figure] < high, figure
    # the interval resamples whole texts: the same draws over a story-by-story reference give it
    reference = _per_text_reference(tiny_model, tiny_tokenizer, noisy)
    draws = bootstrap_texts(len(STORIES))
    resampled = (reference[draws, 1].sum(1) - reference[draws, 0].sum(1)) / reference[draws, 2].sum(1)
    np.testing.assert_allclose(m["delta_ce_ci95"], np.percentile(resampled, [2.5, 97.5]), atol=1e-5)


def test_a_paired_difference_resolves_what_two_intervals_cannot(tiny_model, tiny_tokenizer):
    from saekit.evaluation.splice import paired_difference

    def scored(reconstruct):
        layer = resolve_layer(tiny_model, TINY_LAYER)
        return splice_metrics(tiny_model, tiny_tokenizer, layer, STORIES, reconstruct,
                              torch.zeros(tiny_model.config.hidden_size), max_length=16, batch_size=3,
                              progress=False, keep_per_text=True)

    worse, better = scored(lambda h: h + 0.30 * torch.sin(h * 7)), scored(lambda h: h + 0.25 * torch.sin(h * 7))
    paired = paired_difference(worse["per_text"], better["per_text"])
    assert paired["difference"] == pytest.approx(worse["delta_ce"] - better["delta_ce"])
    assert 0 < paired["ci95"][0] < paired["difference"] < paired["ci95"][1]
    assert paired["ci95"][1] - paired["ci95"][0] < worse["delta_ce_ci95"][1] - worse["delta_ce_ci95"][0]
    assert paired_difference(worse["per_text"], worse["per_text"]) == {"difference": 0.0, "ci95": [0.0, 0.0]}
    shorter = scored(lambda h: h)["per_text"]
    shorter.predictions = shorter.predictions[:-1]
    with pytest.raises(ValueError, match="same texts"):
        paired_difference(worse["per_text"], shorter)


def test_the_fast_splice_falls_back_to_the_whole_model_with_a_line(tiny_model, tiny_tokenizer, monkeypatch, capsys):
    """Where replaying the blocks below the layer does not give the clean pass (forced here), every
    variant runs the whole model, says so in one line, and the figures are the plain path's."""
    from saekit.evaluation.splice import BelowLayerCache
    noisy = lambda h: h + 0.3 * torch.sin(h * 7)  # noqa: E731
    plain = splice_metrics(tiny_model, tiny_tokenizer, resolve_layer(tiny_model, TINY_LAYER), STORIES, noisy,
                           torch.zeros(tiny_model.config.hidden_size), max_length=16, batch_size=3, progress=False,
                           fast=False)
    replayed = BelowLayerCache._replayed

    def off_by_one(self, copies):  # a replay that no longer gives the blocks' output
        replay = replayed(self, copies)

        def shifted(*args, **kwargs):
            out = replay()
            return (out[0] + 1,) + out[1:] if isinstance(out, tuple) else out + 1

        return shifted

    monkeypatch.setattr(BelowLayerCache, "_replayed", off_by_one)
    fallen_back = _run(tiny_model, tiny_tokenizer, noisy, torch.zeros(tiny_model.config.hidden_size))
    assert capsys.readouterr().out.count("the whole model runs for each variant") == 1
    assert fallen_back == plain
