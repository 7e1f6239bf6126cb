"""Token-level labels: known tokens are found with F1 near 1, random latents are unexplained, and the
score comes only from texts that did not choose the label."""
import numpy as np
import pytest
import torch

from conftest import STORIES
from saekit.activations.models import resolve_layer
from saekit.concepts.collect import collect, scoring_half, scoring_windows, text_peaks
from saekit.concepts.exports import build_concepts
from saekit.concepts.labels import F1Interval, choose_labels, token_keys, window_scores
from saekit.concepts.synthetic import synthetic_codes
from saekit.training.sae import TopKSAE

EMBEDDINGS = "llamaforcausallm_model_embed_tokens"  # the SAE reads token embeddings: what fires is known exactly
WORDS = ["the", "a", "kite", "kites", "red", "dog", "cat", "ran", "flew", "sky"] + [f"w{i}" for i in range(60)]
W = {w: i for i, w in enumerate(WORDS)}


def _labels(codes, max_keys=6, min_f1=0.3, seed=0, min_support=1):
    live = sorted(set(codes.firing[1].tolist()))
    is_scoring = scoring_half(len(codes.texts), seed)
    keys = token_keys(codes)
    return choose_labels(codes, keys, is_scoring, live, {}, max_keys, min_f1, min_support), keys, is_scoring


def test_an_sae_that_fires_on_known_tokens_gets_them_as_labels(tiny_model, tiny_tokenizer):
    rng = np.random.default_rng(0)
    vocab = sorted({w for s in STORIES for w in s.replace(".", " .").split()})
    texts = [" ".join(rng.choice(vocab, 15)) for _ in range(120)]
    embed = tiny_model.get_input_embeddings().weight.detach()
    d = embed.shape[1]
    sae = TopKSAE(d, 16, 4)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-100)  # every latent but the two below is dead
        for latent, words, threshold in ((0, ["cat"], 0.6), (1, ["dog", "bird"], 0.75)):
            for word in words:
                e = embed[tiny_tokenizer.convert_tokens_to_ids(word)]
                sae.W_enc[latent] += e / e.norm() ** 2  # 1 on the word's own embedding, small elsewhere
            sae.b_enc[latent] = -threshold
        sae.W_dec.copy_(torch.eye(16, d))
    codes = collect(tiny_model, tiny_tokenizer, resolve_layer(tiny_model, EMBEDDINGS), sae.eval(), texts,
                    max_length=20, batch_size=16, progress=False)
    labels, _, _ = _labels(codes)
    assert set(labels) == {0, 1}
    assert (labels[0].rule, labels[0].keys) == ("token", [("cat",)]) and labels[0].text == "cat"
    assert labels[1].rule == "token" and sorted(labels[1].keys) == [("bird",), ("dog",)]
    for label in labels.values():
        assert label.explained and label.f1 > 0.95 and label.precision > 0.95 and label.recall > 0.95


def _planted_codes(seed=0):
    planted = {0: lambda b, w, a: np.isin(w, [W["kite"], W["kites"]]),  # a token set
               1: lambda b, w, a: b == W["the"],  # the token before
               2: lambda b, w, a: (b == W["red"]) & (w == W["dog"])}  # a bigram
    return synthetic_codes(WORDS, 80, 64, 64, 4, planted, seed=seed)


def test_planted_rules_are_found_and_random_latents_are_unexplained():
    codes = _planted_codes()
    labels, keys, is_scoring = _labels(codes)
    assert (labels[0].rule, sorted(labels[0].keys)) == ("token", [("kite",), ("kites",)])
    assert (labels[1].rule, labels[1].keys, labels[1].text) == ("previous token", [("the",)], "after: the")
    assert (labels[2].rule, labels[2].keys, labels[2].text) == ("bigram ending", [("red", "dog")], "red [dog]")
    assert all(labels[i].f1 == 1.0 and labels[i].explained for i in (0, 1, 2))
    frequency = np.bincount(codes.firing[1], minlength=codes.n_latents) / codes.n_tokens
    random_latents = [i for i in labels if i > 2]
    assert max(frequency[random_latents]) > 0.1  # frequent ones among them too
    for i in random_latents:  # they fire independently of the text
        label = labels[i]
        assert not label.explained and label.f1 < 0.3
        assert label.text.startswith("unexplained (") and f"F1 {label.f1:.2f}" in label.text or label.rule is None
    # delphi-style window scores of the same rules on held-out windows
    windows = scoring_windows(codes, text_peaks(codes), list(labels), 10, 4, is_scoring, np.random.default_rng(0))
    assert window_scores(codes, keys, labels[0], windows[0], 4) == (1.0, 1.0)
    detection, fuzzing = window_scores(codes, keys, labels[10], windows[10], 4)
    assert detection < 0.8 and fuzzing < 0.8


def test_the_score_uses_only_texts_that_did_not_choose_the_label():
    is_scoring = scoring_half(80, 0)
    assert is_scoring.sum() == 40  # two halves of whole texts
    codes = synthetic_codes(WORDS, 80, 64, 64, 4, {0: lambda b, w, a: np.isin(w, [W["cat"], W["dog"]])})
    # on the choosing half latent 0 fires on "cat" only, on the scoring half on "dog" only
    scoring_token = is_scoring[codes.doc]
    silence = (codes.latents == 0) & np.where(scoring_token, codes.token_ids - 1 == W["cat"],
                                              codes.token_ids - 1 == W["dog"])[:, None]
    codes.latents[silence], codes.values[silence] = -1, 0
    labels, _, _ = _labels(codes)
    label = labels[0]
    assert label.keys == [("cat",)] and label.choosing_f1 == 1.0  # perfect where it was chosen
    assert label.f1 == 0.0 and label.precision == 0.0 and not label.explained  # and scored where it fails
    assert label.scoring_fires == int((codes.latents[scoring_token & codes.distinct] == 0).sum()) > 0
    # stage 04's own path (build_concepts) splits the texts the same way: chosen on one half, scored on the other
    live = sorted(set(codes.firing[1].tolist()))
    no_output_side = {i: {"method": "N/A", "promoted": [], "suppressed": []} for i in live}
    built = build_concepts(codes, no_output_side, {"model_id": "m", "layer_signature": "l", "sae_id": "s", "k": 4},
                           top_n=3, context=2, per_quantile=1, non_activating=1, scoring_examples=4, max_keys=6,
                           min_f1=0.3, min_support=1)
    staged = built.labels[0]
    assert staged.keys == [("cat",)] and staged.choosing_f1 == 1.0 and staged.f1 == 0.0


@pytest.mark.parametrize("max_keys", [1, 3])
def test_labels_list_at_most_max_keys(max_keys):
    labels, _, _ = _labels(_planted_codes(), max_keys=max_keys)
    assert all(len(label.keys) <= max_keys for label in labels.values())
    assert labels[1].explained  # one key is enough for "after the"


def test_latents_with_few_firings_are_not_scorable_and_each_f1_has_a_text_bootstrap_interval():
    codes = _planted_codes()
    counted = (codes.scorable & scoring_half(80, 0)[codes.doc])[:, None]
    fires = {lat: int(((codes.latents == lat) & counted).sum()) for lat in (0, 1, 2)}
    rare = min(fires, key=fires.get)
    labels, keys, is_scoring = _labels(codes, min_support=fires[rare] + 1)
    assert not labels[rare].scorable and not labels[rare].explained and labels[rare].text.startswith("not scorable")
    assert labels[rare].scoring_fires == fires[rare]
    for lat in set(fires) - {rare}:
        assert labels[lat].scorable and labels[lat].explained
    everyone, _, _ = _labels(codes, min_support=1)
    assert all(everyone[lat].scorable for lat in everyone) and everyone[rare].explained
    # the interval: the F1 from per-text counts is the label's, and a bootstrap of texts by hand agrees
    interval = F1Interval(codes, codes.scorable & is_scoring[codes.doc], 0)
    for lat in (0, 1, 2, 3):
        label = everyone[lat]
        tp, predicted, fired = interval.counts(lat, keys.keys[label.rule], label.key_ids)
        assert 2 * tp.sum() / (predicted.sum() + fired.sum()) == pytest.approx(label.f1)
        assert label.f1_low <= label.f1 <= label.f1_high
        draws = np.random.default_rng(5).integers(0, len(tp), (2000, len(tp)))
        total = predicted[draws].sum(1) + fired[draws].sum(1)
        by_hand = np.divide(2 * tp[draws].sum(1), total, out=np.zeros(len(draws)), where=total > 0)
        assert label.f1_low == pytest.approx(np.percentile(by_hand, 2.5), abs=0.03)
        assert label.f1_high == pytest.approx(np.percentile(by_hand, 97.5), abs=0.03)
    assert everyone[3].f1_high - everyone[3].f1_low > 0.05  # a random latent's score is uncertain
