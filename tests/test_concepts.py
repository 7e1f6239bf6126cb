"""Stage 04's collection and exports on the tiny model, and the notebook on smoke artifacts."""
import json

import numpy as np
import pytest
import torch

from conftest import CONCEPT_TEXTS, ROOT, TINY_LAYER, alter_one_character, build_concept_set, collect_codes, concept_sae
from saekit.activations.models import forward_to_layer, resolve_layer
from saekit.base.integrity import IntegrityError
from saekit.base.settings import load_settings
from saekit.concepts import collect as C
from saekit.concepts.exports import ConceptsMismatchError, open_concepts, publish
from saekit.notebooks import run_notebook
from saekit.training.sae import BatchTopKSAE, TopKSAE

@pytest.mark.parametrize("architecture", [TopKSAE, BatchTopKSAE])
def test_codes_and_top_examples_match_a_brute_force_pass(tiny_model, tiny_tokenizer, architecture):
    # BatchTopK at inference keeps every code above its threshold (0 here: every positive one), so each batch
    # of texts is encoded as wide as its most active token and the batches' widths differ
    sae = concept_sae(architecture=architecture)
    codes = collect_codes(tiny_model, tiny_tokenizer, sae)
    # brute force: every text alone, full codes, special tokens silent
    best = torch.zeros(len(CONCEPT_TEXTS), sae.n_latents)
    seen = set()  # token prefixes met in earlier texts: an opening counts once
    for doc, text in enumerate(CONCEPT_TEXTS):
        enc = tiny_tokenizer(text, return_tensors="pt", truncation=True, max_length=20)
        hidden = forward_to_layer(tiny_model, resolve_layer(tiny_model, TINY_LAYER), enc.input_ids, enc.attention_mask)
        dense = sae.dense_codes(hidden)[0]
        dense[torch.isin(enc.input_ids[0], torch.tensor(tiny_tokenizer.all_special_ids))] = 0
        start, stop = codes.doc_start[doc], codes.doc_start[doc + 1]
        assert codes.token_ids[start:stop].tolist() == enc.input_ids[0].tolist()
        mine = torch.zeros_like(dense)
        for t in range(stop - start):
            for latent, value in zip(codes.latents[start + t], codes.values[start + t]):
                if latent >= 0:
                    mine[t, latent] = float(value)
        torch.testing.assert_close(mine, dense, rtol=1e-4, atol=1e-5)
        ids = enc.input_ids[0].tolist()
        new = torch.tensor([tuple(ids[:p + 1]) not in seen for p in range(len(ids))])
        seen |= {tuple(ids[:p + 1]) for p in range(len(ids))}
        best[doc] = (dense * new.unsqueeze(1)).max(0).values
    assert not codes.countable[codes.pos == 0].any()  # BOS never fires
    peaks = C.text_peaks(codes)
    top = C.top_peaks(peaks, 3, sae.n_latents)
    for latent in range(sae.n_latents):
        expected = sorted(best[:, latent][best[:, latent] > 0].tolist(), reverse=True)[:3]
        np.testing.assert_allclose(peaks.value[top[latent]], expected, rtol=1e-4, atol=1e-5)
        docs = codes.doc[peaks.token[top[latent]]]
        assert len(set(docs)) == len(docs)  # at most one example per text per latent
    stats = C.latent_stats(codes)
    assert stats.fire_counts[5] == 0 and stats.fire_counts.sum() == len(codes.firing[0])
    assert stats.histogram.sum(1).tolist() == stats.fire_counts.tolist()


def test_exports_refer_to_texts_stored_once(tiny_model, tiny_tokenizer):
    sae = concept_sae()
    codes = collect_codes(tiny_model, tiny_tokenizer, sae)
    built = build_concept_set(codes, tiny_model, tiny_tokenizer, sae)
    texts = built.texts
    assert texts["texts"] == CONCEPT_TEXTS and len(texts["tokens"]) == len(CONCEPT_TEXTS)
    assert 5 not in built.records and built.top_texts["5"] == []  # the dead latent
    assert built.meta["live_latents"] == len(built.records) > 0
    for index, record in built.records.items():
        assert record["label"]["text"] and 0 <= record["label"]["f1"] <= 1  # every live latent scored
        assert record["title"] == record["label"]["text"] and record["name"] is None
        for e in record["examples"]["top"] + record["examples"]["quantiles"]:
            token = texts["vocab"][texts["tokens"][e["doc"]][e["pos"]]]
            assert token == tiny_tokenizer.decode([tiny_tokenizer(CONCEPT_TEXTS[e["doc"]]).input_ids[e["pos"]]])
            assert dict(e["acts"])[e["pos"]] == e["score"] > 0 and e["pos"] > 0
        top = record["examples"]["top"]
        assert [e["score"] for e in top] == sorted((e["score"] for e in top), reverse=True)
        for e in record["examples"]["silent"]:  # silent throughout its window
            start, stop = C.window(codes, int(codes.doc_start[e["doc"]]) + e["pos"], 2)
            assert not C.latent_activations(codes, index, start, stop).any()
        seed_keys = built.top_texts[str(index)]
        assert {"text", "score", "token_str", "token_idx"} <= set(seed_keys[0])
        assert [e["score"] for e in seed_keys] == pytest.approx([e["score"] for e in top], abs=1e-4)
    assert not any(text in json.dumps(built.records) for text in CONCEPT_TEXTS)  # no example carries its text


def test_identical_openings_count_once_and_stay_on_one_side_of_the_split(tiny_model, tiny_tokenizer):
    sae = concept_sae()
    codes = collect_codes(tiny_model, tiny_tokenizer, sae)
    # a prefix id is shared exactly by tokens whose texts agree up to them
    for a, b in [(0, 8), (0, 1), (3, 11), (3, 4)]:
        first_a, first_b = codes.doc_start[a], codes.doc_start[b]
        n = min(codes.doc_start[a + 1] - first_a, codes.doc_start[b + 1] - first_b)
        for p in range(n):
            ids_a, ids_b = codes.token_ids[first_a:first_a + p + 1], codes.token_ids[first_b:first_b + p + 1]
            same = ids_a.tolist() == ids_b.tolist()
            assert (codes.prefix_id[first_a + p] == codes.prefix_id[first_b + p]) == same
    assert not codes.distinct[codes.doc_start[8]:].any()  # texts 8-15 repeat texts 0-7 whole
    built = build_concept_set(codes, tiny_model, tiny_tokenizer, sae, top_n=5, per_quantile=3)
    is_scoring = C.scoring_half(len(CONCEPT_TEXTS), 0)
    for i, record in built.records.items():
        shown = record["examples"]["top"] + record["examples"]["quantiles"]
        prefixes = [codes.prefix_id[codes.doc_start[e["doc"]] + e["pos"]] for e in shown]
        assert len(set(prefixes)) == len(prefixes)  # no opening shown twice
        assert all(e["doc"] < 8 for e in shown)
        namer = built.namer_examples[i]
        scoring = built.windows[i].activating
        assert not set(codes.prefix_id[namer]) & set(codes.prefix_id[scoring])
        assert not is_scoring[codes.doc[namer]].any() and is_scoring[codes.doc[scoring]].all()


def test_intervals_partition_the_firings_and_examples_are_drawn_at_random(tiny_model, tiny_tokenizer):
    sae = concept_sae()
    codes = collect_codes(tiny_model, tiny_tokenizer, sae)
    # ties on an edge fall in one interval: (0, 1], (1, 2], (2, 3], (3, 4]
    values = np.array([1, 1, 1, 2, 4, 4], np.float32)
    token, latent, _ = codes.firing
    widest = max(set(latent.tolist()), key=lambda j: len(set(codes.doc[token[latent == j]].tolist())))
    ones = token[(latent == widest) & codes.distinct[token]]
    tokens = ones[np.unique(codes.doc[ones], return_index=True)[1]][:6]  # one a text
    assert len(tokens) == 6
    intervals = C.interval_examples(widest, tokens, values, codes, set(), 9, 0, np.random.default_rng(0))
    assert [(iv.number, iv.low, iv.high, iv.count) for iv in intervals] == [(4, 3, 4, 2), (2, 1, 2, 1), (1, 0, 1, 3)]
    assert sorted(t for iv in intervals for t in iv.examples) == sorted(tokens.tolist())
    stats = C.latent_stats(codes)
    draws = {}
    for seed in (0, 1, 2):
        built = build_concept_set(codes, tiny_model, tiny_tokenizer, sae, top_n=2, per_quantile=2, seed=seed)
        for i, record in built.records.items():
            bins = sorted(record["quantile_bins"], key=lambda b: b["quantile"])
            assert sum(b["count"] for b in bins) == stats.fire_counts[i]
            assert sum(b["contains"] for b in bins) == pytest.approx(record["frequency"])
            assert all(a["max"] <= b["min"] for a, b in zip(bins, bins[1:]))
            assert bins[-1]["max"] == record["max_activation"]
            top = {(e["doc"], e["pos"]) for e in record["examples"]["top"]}
            by_number = {b["quantile"]: b for b in bins}
            for e in record["examples"]["quantiles"]:
                assert (e["doc"], e["pos"]) not in top
                b = by_number[e["quantile"]]
                assert b["min"] - 1e-4 < e["score"] <= b["max"] + 1e-4
            draws.setdefault(seed, []).append([(e["doc"], e["pos"]) for e in record["examples"]["quantiles"]])
    assert draws[0] != draws[1] or draws[0] != draws[2]  # drawn at random, seeded
    again = build_concept_set(codes, tiny_model, tiny_tokenizer, sae, top_n=2, per_quantile=2, seed=0)
    assert [[(e["doc"], e["pos"]) for e in r["examples"]["quantiles"]] for r in again.records.values()] == draws[0]


def test_exports_are_published_as_one_set_tied_to_the_sae(tiny_model, tiny_tokenizer, tmp_path):
    sae = concept_sae()
    built = build_concept_set(collect_codes(tiny_model, tiny_tokenizer, sae), tiny_model, tiny_tokenizer, sae)
    folder = publish(tmp_path, built)
    assert (tmp_path / "concepts_id.txt").read_text().strip() == folder.name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sae_id"] == "sae-a" and set(manifest["files"]) == {"concepts.json", "texts.json", "concepts.csv",
                                                                          "top_texts.json"}
    assert (tmp_path / "top_texts.json").read_bytes() == (folder / "top_texts.json").read_bytes()
    concepts, texts, _ = open_concepts(tmp_path, "sae-a")
    assert len(concepts["latents"]) == len(built.records) and texts["texts"] == CONCEPT_TEXTS
    with pytest.raises(ConceptsMismatchError, match="Run stage 04"):
        open_concepts(tmp_path, "another-sae")
    second = publish(tmp_path, built)  # the previous set stays for a reader that has it open; older ones go
    third = publish(tmp_path, built)
    assert not folder.exists() and second.exists() and third.exists()
    (third / "texts.json").write_text("{}")
    with pytest.raises(IntegrityError, match="corrupt"):
        open_concepts(tmp_path, "sae-a")



@pytest.mark.parametrize("name", ["concepts.json", "texts.json", "concepts.csv", "top_texts.json", "manifest.json"])
def test_one_altered_character_in_any_file_of_the_set_is_refused(tiny_model, tiny_tokenizer, tmp_path, name):
    sae = concept_sae()
    folder = publish(tmp_path, build_concept_set(collect_codes(tiny_model, tiny_tokenizer, sae), tiny_model, tiny_tokenizer, sae))
    alter_one_character(folder / name)
    with pytest.raises((IntegrityError, ConceptsMismatchError), match="Run stage 04"):
        open_concepts(tmp_path, "sae-a")

def test_concepts_notebook_on_smoke_artifacts(smoke_args):
    run_notebook(ROOT / "04_name_sae_concepts.ipynb", smoke_args)
    settings = load_settings(smoke_args)
    concepts, _, folder = open_concepts(settings.store, TopKSAE.load(settings.store / "sae_model" / "topk_sae.pt")[1]
                                        .get("sae_id"))
    latents = concepts["latents"].values()
    assert len(latents) == concepts["meta"]["live_latents"] > 0
    assert sum(1 for c in latents if c["name"]) == 2  # N_LATENTS_TO_NAME=2 with the tiny model as namer
    for c in latents:  # a name is the title only where it scored above the label
        if c["title_source"] == "name":
            assert c["name"]["score"] > np.mean([c["label"]["detection"], c["label"]["fuzzing"]])
        else:
            assert c["title"] == c["label"]["text"]
    assert (folder / "concepts.csv").read_text().startswith("index,title,title_source,label")
    exported = settings.store / "neuronpedia"  # stage 04 also writes the set in Neuronpedia's formats
    assert json.loads((exported / "run_settings.json").read_text())["concepts_id"] == folder.name
    batch = json.loads((exported / "batch-0.json").read_text())
    assert len(batch["features"]) == min(len(latents), 128) and (exported / "upload" / "batch-0.json").exists()
