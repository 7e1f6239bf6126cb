import json

import torch

from conftest import ROOT, STORIES, TINY_LAYER
from saekit import concepts as C
from saekit.models import forward_to_layer, resolve_layer
from saekit.notebooks import run_notebook
from saekit.sae import TopKSAE
from saekit.settings import load_settings

TEXTS = [f"{a} {b}" for a, b in zip(STORIES, STORIES[1:] + STORIES[:1])] * 2  # 16 texts, repeats included


def _sae(d=32, n=64, k=4, dead=(5,)):
    torch.manual_seed(1)
    sae = TopKSAE(d, n, k)
    sae.init_weights(torch.zeros(d), torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_enc.mul_(3)
        for j in dead:  # never above zero: never wins a TopK slot with a positive value
            sae.W_enc[j] = 0
            sae.b_enc[j] = -100
    return sae.eval()


def _collect(model, tok, sae, top_n=3, texts=TEXTS):
    return C.collect(model, tok, resolve_layer(model, TINY_LAYER), sae, texts, top_n=top_n, context_tokens=2,
                     sample_size=8, background_texts=6, max_length=20, batch_size=5, progress=False)


def test_streaming_buffers_match_a_brute_force_top_n(tiny_model, tiny_tokenizer):
    sae = _sae()
    col = _collect(tiny_model, tiny_tokenizer, sae)
    # brute force: every text alone, full codes, special tokens masked, max per (text, latent)
    best = torch.zeros(len(TEXTS), sae.n_latents)
    for doc, text in enumerate(TEXTS):
        enc = tiny_tokenizer(text, return_tensors="pt", truncation=True, max_length=20)
        hidden = forward_to_layer(tiny_model, resolve_layer(tiny_model, TINY_LAYER), enc.input_ids, enc.attention_mask)
        codes = sae.dense_codes(hidden)[0]
        codes[torch.isin(enc.input_ids[0], torch.tensor(tiny_tokenizer.all_special_ids))] = 0
        best[doc] = codes.max(0).values
    for latent in range(sae.n_latents):
        expected = sorted(best[:, latent][best[:, latent] > 0].tolist(), reverse=True)[:3]
        got = [float(col.top.score[latent, s]) for s in col.top.entries(latent)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-5)
        docs = [int(col.top.doc[latent, s]) for s in col.top.entries(latent)]
        assert len(set(docs)) == len(docs)  # at most one example per text per latent
    assert int(col.fire_counts.sum()) > 0


def test_exports_schema_dead_latents_and_token_alignment(tiny_model, tiny_tokenizer):
    sae = _sae()
    col = _collect(tiny_model, tiny_tokenizer, sae)
    top_texts, concepts = C.build_exports(col, tiny_model, tiny_tokenizer, sae, context_tokens=2, per_quantile=1,
                                          non_activating=2, meta={"model_id": "tiny"})
    assert set(top_texts) == {str(i) for i in range(sae.n_latents)}
    assert top_texts["5"] == [] and "5" not in concepts["latents"]  # the dead latent
    assert concepts["meta"]["live_latents"] == len(concepts["latents"]) > 0
    for key, examples in top_texts.items():
        for e in examples:
            assert {"text", "score", "token_str", "token_idx", "doc_index", "context"} <= set(e)
            ids = tiny_tokenizer(e["text"], truncation=True, max_length=20).input_ids
            assert e["token_idx"] > 0  # BOS never counts as a peak
            assert tiny_tokenizer.decode([ids[e["token_idx"]]]) == e["token_str"]
            ctx = e["context"]
            assert len(ctx["tokens"]) == len(ctx["activations"]) and ctx["tokens"][ctx["peak"]] == e["token_str"]
            assert abs(ctx["activations"][ctx["peak"]] - e["score"]) < 1e-3
        assert [e["score"] for e in examples] == sorted((e["score"] for e in examples), reverse=True)
    for latent in concepts["latents"].values():
        assert {"label", "label_source", "label_score", "logit_lens", "histogram", "frequency",
                "quantile_examples", "non_activating"} <= set(latent)
        assert len(latent["logit_lens"]["promoted"]) == 10
        assert sum(latent["histogram"]["counts"]) == round(latent["frequency"] * col.n_tokens)
        assert all(e["score"] == 0 for e in latent["non_activating"])
    json.dumps(concepts, default=str)


def test_detection_score_on_a_constructed_case():
    assert C.balanced_accuracy([True, True, False, True], [False, False]) == (0.75 + 1.0) / 2
    assert C.balanced_accuracy([True], []) is None

    def window(*tokens):
        return {"context": {"tokens": list(tokens), "activations": [1.0] * len(tokens), "peak": 0}, "token_str": tokens[0]}

    activating = [window(" the", " cat", " sat"), window(" a", " cat"), window(" dog", " ran")]
    non_activating = [window(" the", " dog"), window(" big", " Cat"), window(" sun")]
    # "cat" matches tokens after stripping and lower-casing: 2 of 3 hits, 1 of 3 false alarms
    assert abs(C.label_score([("cat",)], activating, non_activating) - (2 / 3 + 2 / 3) / 2) < 1e-12


def test_labels_follow_the_rules_in_order():
    def example(tokens, peak):
        return {"token_str": tokens[peak], "context": {"tokens": tokens, "activations": [1.0] * len(tokens), "peak": peak}}

    same_peak = [example([" a", " cat", " ran"], 1)] * 3 + [example([" a", " dog", " ran"], 1)]
    assert C.make_label(same_peak, [], C.Counter(), 1)[:2] == ('"cat"', "peak token")
    same_next = [example([" a", w, " ran"], 1) for w in (" cat", " dog", " owl")]
    assert C.make_label(same_next, [], C.Counter(), 1)[:2] == ('before "ran"', "next token")


def test_naming_runs_and_resumes(tiny_model, chat_tokenizer, tmp_path, monkeypatch):
    sae = _sae()
    col = _collect(tiny_model, chat_tokenizer, sae)
    top_texts, concepts = C.build_exports(col, tiny_model, chat_tokenizer, sae, context_tokens=2, per_quantile=1,
                                          non_activating=2, meta={})
    chosen = C.latents_to_name(concepts, 3)
    items = {i: {"top": top_texts[str(i)], "activating": concepts["latents"][str(i)]["_activating"],
                 "non_activating": concepts["latents"][str(i)]["non_activating"]} for i in chosen}
    names = C.name_latents(tiny_model, chat_tokenizer, items, tmp_path / "names.json", "fp", max_new_tokens=4,
                           progress=False)
    assert set(names) == set(chosen) and all(isinstance(n["name"], str) and n["name"] for n in names.values())
    calls = []
    monkeypatch.setattr(C, "write_names", lambda *a, **k: calls.append(a) or [])
    again = C.name_latents(tiny_model, chat_tokenizer, items, tmp_path / "names.json", "fp", 4, progress=False)
    assert again == names and calls == []  # resumed: nothing named twice


def test_concepts_notebook_on_smoke_artifacts(smoke_args):
    run_notebook(ROOT / "04_name_sae_concepts.ipynb", smoke_args)
    store = load_settings(smoke_args).store
    top_texts = json.loads((store / "top_texts.json").read_text())
    concepts = json.loads((store / "concepts.json").read_text())
    assert len(top_texts) == concepts["meta"]["n_latents"]
    assert any(c["name"] for c in concepts["latents"].values())
    assert (store / "concepts.csv").read_text().startswith("index,label,name")
