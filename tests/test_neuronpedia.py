"""store/neuronpedia/: stage 04's concepts in the files Neuronpedia's importers read (saekit.concepts.neuronpedia).

The keys checked are those that neuronpedia-utils' convert-saedashboard-to-neuronpedia-export.py and
SAEDashboard's neuronpedia_export.py read from each batch-<n>.json (hijohnnylin/neuronpedia@ebb8426,
jbloomAus/SAEDashboard@db4839a), the body of Neuronpedia's /api/feature/upload-batch route as its schema
takes it, and skipped_indexes.json as /api/admin/upload-skipped-features reads it. The values are
checked against the codes collected by the model, not only against the records they were made from."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import CONCEPT_TEXTS, build_concept_set, collect_codes, concept_sae, synthetic_concept_set
from saekit.base import integrity
from saekit.base.atomic import StoreWriteError
from saekit.concepts import neuronpedia as NP
from saekit.concepts.exports import apply_names, publish
from saekit.concepts.naming import Name

# what the converters read from a batch, a feature and an activation (batch_data[...], feature_data[...],
# activation_data[...]), with the type each value has in SAEDashboard's output
BATCH_KEYS = {"model_id": str, "layer": int, "sae_set": str, "sae_id_suffix": type(None), "features": list}
FEATURE_LISTS = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                 "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
                 "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
                 "neg_str", "neg_values", "pos_str", "pos_values", "freq_hist_data_bar_heights",
                 "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                 "decoder_weights_dist", "activations", "vector")
ACTIVATION_KEYS = ("tokens", "values", "bin_min", "bin_max", "bin_contains", "qualifying_token_index")
NUMBER = (int, float)


def _read(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))}


def _batches(files: dict[str, dict]) -> list[dict]:
    names = [n for n in files if n.startswith("batch-")]  # what the converters list: batch-* at the top
    assert sorted(names) == sorted(f"batch-{i}.json" for i in range(len(names))) and names
    return [files[f"batch-{i}.json"] for i in range(len(names))]


def _check_shapes(batch: dict) -> None:
    """Every key the importers read, with its type and the shapes they rely on."""
    for key, kind in BATCH_KEYS.items():
        assert isinstance(batch[key], kind), key
    assert 0 < len(batch["features"]) <= NP.FEATURES_PER_BATCH
    for f in batch["features"]:
        assert isinstance(f["feature_index"], int) and isinstance(f["frac_nonzero"], float)
        assert 0 < f["frac_nonzero"] <= 1
        for key in FEATURE_LISTS:
            assert isinstance(f[key], list), key
        assert all(isinstance(t, str) for t in f["pos_str"] + f["neg_str"])
        assert all(isinstance(v, float) for v in f["pos_values"] + f["neg_values"])
        # an output side that is N/A leaves both lists empty, as Neuronpedia shows for a feature with none
        assert len(f["pos_str"]) == len(f["pos_values"]) == len(f["neg_str"]) == len(f["neg_values"]) in (0, 10)
        assert f["pos_values"] == sorted(f["pos_values"], reverse=True)  # the most promoted first
        assert f["neg_values"] == sorted(f["neg_values"])  # the most suppressed first
        assert len(f["freq_hist_data_bar_values"]) == len(f["freq_hist_data_bar_heights"]) > 0
        assert all(isinstance(h, int) and h >= 0 for h in f["freq_hist_data_bar_heights"])
        assert np.all(np.diff(f["freq_hist_data_bar_values"]) > 0)
        assert isinstance(f["n_prompts_total"], int) and isinstance(f["n_tokens_in_prompt"], int)
        assert isinstance(f["dataset"], str) and f["activations"]
        for a in f["activations"]:
            for key in ACTIVATION_KEYS:
                assert key in a, key
            assert all(isinstance(t, str) for t in a["tokens"]) and all(isinstance(v, NUMBER) for v in a["values"])
            assert len(a["tokens"]) == len(a["values"]) > 0
            peak = a["qualifying_token_index"]
            assert isinstance(peak, int) and 0 <= peak < len(a["values"])
            # the converters take maxValue = max(values), maxValueTokenIndex = values.index(maxValue)
            assert a["values"][peak] == max(a["values"]) > 0 and min(a["values"]) >= 0
            assert all(isinstance(a[k], NUMBER) for k in ("bin_min", "bin_max", "bin_contains"))
            if a["bin_min"] == -1:  # a top example: SAEDashboard's TOP ACTIVATIONS group
                assert a["bin_contains"] == -1 and max(a["values"]) <= a["bin_max"]
            else:  # an INTERVAL group: the peak lies in it, and the share of tokens it holds
                assert a["bin_min"] <= max(a["values"]) <= a["bin_max"] and 0 < a["bin_contains"] <= f["frac_nonzero"]


def _check_upload(body: dict, batch: dict) -> None:
    """The body of POST /api/feature/upload-batch, as its yup schema and its checks take it."""
    assert isinstance(body["modelId"], str) and body["modelId"] == body["modelId"].lower()
    assert body["source"] == f"{batch['layer']}-{batch['sae_set']}" and body["source"] == body["source"].lower()
    assert 1 <= len(body["features"]) <= 128
    assert len({f["index"] for f in body["features"]}) == len(body["features"])
    for f, feature in zip(body["features"], batch["features"]):
        assert f["index"] == feature["feature_index"] and 0 <= f["density"] <= 1
        assert f["density"] == feature["frac_nonzero"]
        for side, tokens, values in (("topLogits", "pos_str", "pos_values"), ("bottomLogits", "neg_str", "neg_values")):
            assert len(f[side]) <= 20
            assert [(x["token"], x["value"]) for x in f[side]] == list(zip(feature[tokens], feature[values]))
        for e in f["explanations"]:
            assert 1 <= len(e["text"]) <= 512 and e["methodName"] is None and e["modelName"] is None
        assert len(f["activations"]) == len(feature["activations"]) >= 1
        for a, b in zip(f["activations"], feature["activations"]):
            assert a["tokens"] == b["tokens"] and a["values"] == b["values"] and 1 <= len(a["tokens"]) <= 1024
            assert a["quantileMin"] == b["bin_min"] and a["quantileMax"] == b["bin_max"]
            top = b["bin_contains"] == -1  # the route takes no -1: a top example's share is null
            assert a["quantileFraction"] == (None if top else b["bin_contains"])
            assert a["quantileFraction"] is None or 0 <= a["quantileFraction"] <= 1


def _dense(codes) -> np.ndarray:
    """[tokens, latents] every code, from the collected top-k slots."""
    dense = np.zeros((len(codes.token_ids), codes.n_latents), np.float32)
    rows, slots = np.nonzero(codes.latents >= 0)
    dense[rows, codes.latents[rows, slots]] = codes.values[rows, slots]
    return dense


def test_every_field_the_importers_read_holds_what_stage_04_recorded(tiny_model, tiny_tokenizer, tmp_path):
    sae = concept_sae()
    codes = collect_codes(tiny_model, tiny_tokenizer, sae)
    built = build_concept_set(codes, tiny_model, tiny_tokenizer, sae, per_quantile=2)
    set_folder = publish(tmp_path, built)
    files = _read(tmp_path / "neuronpedia")
    batches = _batches(files)
    dense = _dense(codes)
    n_tokens = int(codes.countable.sum())
    context = built.meta["context_tokens"]
    live = sorted(built.records)
    assert [f["feature_index"] for b in batches for f in b["features"]] == live
    assert files["skipped_indexes.json"]["skipped_indexes"] == sorted(set(range(sae.n_latents)) - set(live)) == [5]
    run = files["run_settings.json"]
    assert run["concepts_id"] == set_folder.name == (tmp_path / "concepts_id.txt").read_text().strip()
    assert run["sae_id"] == "sae-a" and run["d_sae"] == sae.n_latents and run["live_latents"] == len(live)
    for n, batch in enumerate(batches):
        _check_shapes(batch)
        assert batch["layer"] == 1 and batch["model_id"] == "tiny"  # TINY_LAYER is block 1
        _check_upload(files[f"upload/batch-{n}.json"], batch)
        for f in batch["features"]:
            i, record = f["feature_index"], built.records[f["feature_index"]]
            column = dense[:, i]
            # output side, frequency and histogram: as recorded, and as the codes say
            lens = record["output_side"]
            assert list(zip(f["pos_str"], f["pos_values"])) == [tuple(p) for p in lens["promoted"]]
            assert list(zip(f["neg_str"], f["neg_values"])) == [tuple(p) for p in lens["suppressed"]]
            fires = int((column > 0).sum())
            assert f["frac_nonzero"] == record["frequency"] == pytest.approx(fires / n_tokens)
            assert f["freq_hist_data_bar_heights"] == record["histogram"]["counts"]
            assert sum(f["freq_hist_data_bar_heights"]) == fires
            edges = record["histogram"]["bin_edges"]
            assert all(lo < c < hi for c, lo, hi in zip(f["freq_hist_data_bar_values"], edges, edges[1:]))
            assert f["n_prompts_total"] == len(CONCEPT_TEXTS)
            assert f["n_tokens_in_prompt"] == max(codes.doc_start[1:] - codes.doc_start[:-1])
            # examples: top ones first, then by quantile, each the recorded window, token by token
            examples = record["examples"]["top"] + record["examples"]["quantiles"]
            assert len(f["activations"]) == len(examples) >= len(record["examples"]["top"])
            bins = {b["quantile"]: b for b in record["quantile_bins"]}
            for a, e in zip(f["activations"], examples):
                ids = tiny_tokenizer(CONCEPT_TEXTS[e["doc"]], truncation=True, max_length=20).input_ids
                start, stop = max(0, e["pos"] - context), min(len(ids), e["pos"] + context + 1)
                assert a["tokens"] == [tiny_tokenizer.decode([t]) for t in ids[start:stop]]
                first = int(codes.doc_start[e["doc"]])
                assert a["values"] == pytest.approx(column[first + start:first + stop].tolist(), abs=1e-4)
                assert a["qualifying_token_index"] == e["pos"] - start and a["values"][e["pos"] - start] == e["score"]
                if "quantile" in e:
                    b = bins[e["quantile"]]
                    assert (a["bin_min"], a["bin_max"], a["bin_contains"]) == (b["min"], b["max"], b["contains"])
                else:
                    assert a["bin_max"] == record["max_activation"] == pytest.approx(float(column.max()), abs=1e-4)
            # the intervals: equal widths of (0, max], half-open, each holding the firing tokens the codes put
            # in it, so their shares sum to the firing frequency; no example repeats a top one
            ordered = sorted(record["quantile_bins"], key=lambda b: b["quantile"])
            width = record["max_activation"] / 4
            for b in ordered:
                assert b["min"] == pytest.approx((b["quantile"] - 1) * width, abs=1e-3)
                assert b["max"] == pytest.approx(b["quantile"] * width, abs=1e-3)
                inside = int(((column > b["min"] + 1e-4) & (column <= b["max"] - 1e-4)).sum())
                around = int(((column > b["min"] - 1e-4) & (column <= b["max"] + 1e-4)).sum())
                assert inside <= b["count"] <= around and b["contains"] == b["count"] / n_tokens
            assert sum(b["count"] for b in ordered) == fires
            windows = [(tuple(a["tokens"]), tuple(a["values"])) for a in f["activations"]]
            assert len(set(windows)) == len(windows)  # no duplicate activation records
    assert not list(tmp_path.glob(".neuronpedia*"))  # nothing staged is left behind




def test_batches_of_128_latents_and_titles_as_explanations(tmp_path):
    built = synthetic_concept_set(300)
    unexplained = min(i for i, r in built.records.items() if not r["label"]["explained"])
    apply_names(built, {unexplained: Name("things", 1.0, 1.0), 7: Name("a name at chance", 0.5, 0.5)}, 0.7)
    publish(tmp_path, built)
    files = _read(tmp_path / "neuronpedia")
    batches = _batches(files)
    live = sorted(built.records)
    assert len(batches) == math.ceil(len(live) / 128) == 3
    assert [[f["feature_index"] for f in b["features"]] for b in batches] == [live[:128], live[128:256], live[256:]]
    assert {b["model_id"] for b in batches} == {"bielik-1.5b-v3.0-instruct"} and {b["layer"] for b in batches} == {16}
    assert files["skipped_indexes.json"]["skipped_indexes"] == sorted(set(range(300)) - set(live))
    assert files["skipped_indexes.json"]["layer"] == "16"
    explained = 0
    for n, batch in enumerate(batches):
        _check_shapes(batch)
        assert all(f["dataset"] == "roneneldan/TinyStories" for f in batch["features"])
        body = files[f"upload/batch-{n}.json"]
        _check_upload(body, batch)
        for f in body["features"]:
            record = built.records[f["index"]]
            texts = [e["text"] for e in f["explanations"]]
            if record["title_source"] == "name" or record["label"]["explained"]:
                assert texts == [record["title"]]
                explained += 1
            else:  # an unexplained latent's best attempt is not offered as an explanation
                assert texts == [] and record["title"].startswith(("unexplained", "not scorable"))
    names = {f["index"]: f["explanations"]
             for n in range(len(batches)) for f in files[f"upload/batch-{n}.json"]["features"]}
    assert names[unexplained] == [{"text": "things", "methodName": None, "modelName": None}]  # it beat the label
    assert names[7] == [{"text": "kite", "methodName": None, "modelName": None}]  # the label: the name did not
    assert names[9][0]["text"] in ("dog | puppy", "puppy | dog")
    assert 2 <= explained < len(live)


def test_the_export_changes_with_the_concepts_pointer_and_only_with_it(tmp_path, monkeypatch):
    pointer = tmp_path / "concepts_id.txt"

    def exported() -> tuple[str, list[str]]:
        folder = tmp_path / "neuronpedia"
        return (json.loads((folder / "run_settings.json").read_text())["concepts_id"],
                sorted(p.name for p in folder.glob("batch-*")))

    first = publish(tmp_path, synthetic_concept_set(300))
    assert exported() == (first.name, ["batch-0.json", "batch-1.json", "batch-2.json"])
    second = publish(tmp_path, synthetic_concept_set(100))  # a re-run: no batch of the old set may remain
    assert exported() == (second.name, ["batch-0.json"]) and pointer.read_text().strip() == second.name

    real_write_text = integrity.write_text

    def pointer_fails(path, text):
        if Path(path) == pointer:
            raise StoreWriteError("disk full")
        real_write_text(path, text)

    monkeypatch.setattr(integrity, "write_text", pointer_fails)  # fails after the old export was moved away
    with pytest.raises(StoreWriteError):
        publish(tmp_path, synthetic_concept_set(300))
    assert pointer.read_text().strip() == second.name and exported() == (second.name, ["batch-0.json"])
    monkeypatch.undo()

    def set_fails(path, obj):
        raise StoreWriteError("disk full")

    monkeypatch.setattr("saekit.concepts.exports._dump", set_fails)  # fails while the set is written
    with pytest.raises(StoreWriteError):
        publish(tmp_path, synthetic_concept_set(300))
    assert pointer.read_text().strip() == second.name and exported() == (second.name, ["batch-0.json"])
    monkeypatch.undo()

    # a kill between moving the old export away and naming the new set: no export, never a stale one;
    # the next stage 04 removes what was left and writes the export of its own set
    replacement = NP.Replacement(tmp_path, NP.stage_export(tmp_path, "killed", {"batch-0.json": {}}))
    replacement.move_old_away()
    assert not (tmp_path / "neuronpedia").exists() and pointer.read_text().strip() == second.name
    third = publish(tmp_path, synthetic_concept_set(300))
    assert exported() == (third.name, ["batch-0.json", "batch-1.json", "batch-2.json"])
    assert not list(tmp_path.glob(".neuronpedia*"))


@pytest.mark.parametrize("model_id,name", [("embedded", "smollm2-135m-instruct"), ("org/Model_X-1B", "model-x-1b"),
                                           ("/some/folder/Qwen2.5-0.5B/", "qwen2.5-0.5b")])
def test_model_and_layer_names(model_id, name):
    assert NP.neuronpedia_model_id(model_id) == name
    assert NP.dataset_name({"dataset": "embedded", "source": "data/stories.jsonl, split heldout"}) == \
        "data/stories.jsonl, split heldout"
    assert NP.dataset_name({"dataset": "roneneldan/TinyStories", "source": "x"}) == "roneneldan/TinyStories"
    assert NP.layer_number("gpt2lmheadmodel_transformer_h_5_mlp") == 5
    assert NP.layer_number("phi3forcausallm_model_layers_12_post_attention_layernorm") == 12


def test_dead_latents_are_decided_on_stage_02s_held_out_rows_and_the_export_says_so(tmp_path):
    from saekit.base.integrity import write_sealed_json
    from saekit.concepts.runner import training_deadness

    built = synthetic_concept_set(300)
    live = sorted(built.records)
    silent = sorted(set(range(300)) - set(live))
    frequency = [0.0 if i in silent[:3] else 0.01 for i in range(300)]  # 3 of the silent ones are dead there
    frequency[live[0]] = 0.0  # a latent that fires on stage 04's texts is live whatever decided
    write_sealed_json(tmp_path / "training_history.json", {"sae_id": "sae-s", "activation_run_id": "run-1",
                                                           "latent_frequency": frequency,
                                                           "history": [{"heldout_n_tokens": 123456}]})
    assert training_deadness(tmp_path, "another-sae") is None  # not this SAE's history: stage 04's texts decide
    decided = training_deadness(tmp_path, "sae-s")
    assert decided["tokens"] == 123456 and "123456 held-out activation rows of run run-1" in decided["decided_on"]
    files = NP.export_files({**built.meta, "dead_latents": decided}, built.records, built.texts)
    assert files["skipped_indexes.json"]["skipped_indexes"] == silent[:3]
    settings = files["run_settings.json"]
    assert settings["dead_latents"] == 3  # silent on both the held-out rows and stage 04's texts
    assert settings["dead_decided_on"] == f"{decided['decided_on']} and {built.meta['n_tokens']} tokens of stage 04's " \
                                          "30 evaluation texts"
    assert settings["silent_on_these_texts_not_dead"] == len(silent) - 3
    fallback = NP.export_files(built.meta, built.records, built.texts)  # an SAE from SAE_PATH: no history
    assert fallback["skipped_indexes.json"]["skipped_indexes"] == silent
    assert "tokens of stage 04's 30 evaluation texts" in fallback["run_settings.json"]["dead_decided_on"]
