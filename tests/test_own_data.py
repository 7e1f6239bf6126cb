"""Issue 19, "your own model and your own data": what a user reads stays true on a model or texts
other than the demo's (a GPT-2 without a usable pad token, a layer whose ablation costs nothing,
a frontier measured on another model)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, STORIES, assert_offline, assert_one_line_error, checksums, copy_store, run_python
from saekit.activations.models import load_model
from saekit.base.settings import load_settings
from saekit.evaluation import verdict


def _word_tokenizer(**special):
    """The test stories' word-level tokenizer with only the special tokens given (maybe none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in STORIES for w in s.replace(".", " .").replace(",", " ,").split()})
    vocab = {w: i for i, w in enumerate(["</s>", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def _default_gpt2_folder(path, tokenizer):
    """A GPT-2 folder as transformers' default GPT2Config saves it: bos and eos 50256, whatever the
    vocabulary (here a few dozen tokens)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    assert config.eos_token_id == 50256 and config.pad_token_id is None
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_gpt2_config_eos_outside_the_vocabulary_pads_with_the_tokenizers_eos(tmp_path):
    folder = _default_gpt2_folder(tmp_path / "gpt2", _word_tokenizer(eos_token="</s>"))
    model, tokenizer = load_model(str(folder))
    assert tokenizer.pad_token == "</s>" and tokenizer.eos_token == "</s>"  # not the config's 50256
    enc = tokenizer(STORIES[:2], return_tensors="pt", padding=True)
    assert enc.input_ids.max() < model.get_input_embeddings().num_embeddings


def test_a_tokenizer_with_no_usable_pad_token_is_refused_in_one_line(tmp_path, smoke_args):
    folder = _default_gpt2_folder(tmp_path / "gpt2", _word_tokenizer())
    stories = tmp_path / "stories.jsonl"
    stories.write_text("\n".join(json.dumps({"text": s}) for s in STORIES))
    store = tmp_path / "store"
    copy_store(smoke_args, store)  # a store with a run and an SAE already: the refusal must leave them as they were
    before = checksums(store)
    proc = run_python([str(ROOT / "01_save_activations.py"), f"--MODEL_ID={folder}", f"--HF_DATASET={stories}",
                 "--LAYER_SIGNATURE=gpt2lmheadmodel_transformer_h_1", f"--STORE_DIR={store}", "--DEVICE=cpu"])
    assert_one_line_error(proc, "no usable padding token", "pad_token")
    assert checksums(store) == before


# --- "CE recovered" when the ablation costs nothing -------------------------------------------

SOUND_HELDOUT = {"l0": 8.0, "dead_fraction": 0.0, "fvu": 0.25}


@pytest.mark.parametrize("ce_mean,case", [(2.4200, "costs nothing"), (2.4203, "within the ΔCE bound"),
                                          (2.3900, "lowers the loss")])
def test_ce_recovered_is_not_judged_when_mean_ablation_costs_nothing(ce_mean, case):
    settings = load_settings([])
    splice = {"eval_texts_in_training": 0, "ce_clean": 2.42, "ce_sae": 2.4217, "ce_mean": ce_mean,
              "delta_ce": 0.0017, "kl_sae": 0.002, "kl_mean": 0.0004}
    splice["ce_recovered_vs_mean"] = (ce_mean - splice["ce_sae"]) / (ce_mean - 2.42) if ce_mean != 2.42 else float("-inf")
    rows = verdict.checks(settings, 8, SOUND_HELDOUT, None, splice)
    ratio = next(c for c in rows if c["check"].startswith("CE-loss recovered"))
    assert ratio["result"] == verdict.NOT_JUDGED, case
    assert verdict.passed(rows)  # ΔCE within bound: the verdict rests on ΔCE
    text = verdict.verdict_text(rows, SOUND_HELDOUT, splice, 8)
    assert text.startswith("PASS") and "CE recovered not judged" in text and "judged by ΔCE and KL" in text
    assert "KL 0.0020" in text and "of the mean-ablation loss recovered" not in text

    costly = {**splice, "ce_sae": 2.52, "delta_ce": 0.10}  # the SAE itself costs too much: ΔCE still fails
    rows = verdict.checks(settings, 8, SOUND_HELDOUT, None, costly)
    assert not verdict.passed(rows)
    assert [c["check"] for c in rows if c["result"] == "FAIL"] == ["delta CE (nats)"]


def test_ce_recovered_is_judged_when_mean_ablation_costs_something():
    splice = {"eval_texts_in_training": 0, "ce_clean": 2.42, "ce_sae": 2.50, "ce_mean": 2.56, "delta_ce": 0.08,
              "ce_recovered_vs_mean": (2.56 - 2.50) / 0.14, "kl_sae": 0.09, "kl_mean": 0.13}
    rows = verdict.checks(load_settings([]), 8, SOUND_HELDOUT, None, splice)
    assert {c["check"] for c in rows if c["result"] == "FAIL"} == {"CE-loss recovered vs mean-ablation",
                                                                   "delta CE (nats)"}
    assert "42.9% of the mean-ablation loss recovered" in verdict.verdict_text(rows, SOUND_HELDOUT, splice, 8)


# --- the frontier belongs to one model and layer -----------------------------------------------

def _frontier_results(folder, **measured_on):
    rows = [{"trainer": "saekit", "k": 8, "l0": 8.0, "delta_ce": 0.034, "recovered_vs_mean": 0.76, "heldout_fvu": 0.27}]
    (folder / "bench_peers.json").write_text(json.dumps({"run_id": "r1", **measured_on, "results": rows}))
    return verdict.load_frontier(folder)


def test_a_frontier_from_another_model_is_named_not_used(tmp_path):
    points = _frontier_results(tmp_path)  # no model recorded: the demo's, as the bench scripts ran it
    assert points[0]["model_id"] == "embedded"
    text = verdict.frontier_position(points, 8.0, 0.0005, "path/to/gpt2", "gpt2lmheadmodel_transformer_h_1")
    assert text.startswith("Not placed on the benchmark frontier") and "another model" in text
    assert "embedded at llamaforcausallm_model_layers_15_post_attention_layernorm" in text and "best" not in text
    assert verdict.same_model_and_layer(points, "path/to/gpt2", "gpt2lmheadmodel_transformer_h_1") == []


def test_the_frontier_of_this_model_and_layer_is_used_and_names_its_texts(tmp_path):
    points = _frontier_results(tmp_path, model_id="m", layer_signature="l", dataset="stories.jsonl")
    same = verdict.frontier_position(points, 8.0, 0.03, "m", "l", "stories.jsonl")
    assert "Best measured at L0 8: saekit 0.0340" in same and "on the same texts" in same
    other_texts = verdict.frontier_position(points, 8.0, 0.03, "m", "l", "valid.jsonl")
    assert "the evaluation texts of stories.jsonl, not this run's valid.jsonl" in other_texts
    assert "Not placed" in verdict.frontier_position(points, 8.0, 0.03, "m", "another layer")


# --- executed notebooks open offline ------------------------------------------------------------

def test_notebook_html_needs_no_network_and_shows_widgets_as_text():
    import nbformat

    from saekit.notebooks import offline_html

    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2,
                                                                            "version_minor": 0}}
    cell = nbformat.v4.new_code_cell("for _ in tqdm(range(3)): pass")
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2, "version_minor": 0},
        "text/plain": "CE with the SAE spliced in: 100% 3/3"})]
    nb.cells = [nbformat.v4.new_markdown_cell("# Stage 03"), cell]
    html = offline_html(nb)
    assert_offline(html)
    assert "CE with the SAE spliced in: 100% 3/3" in html and "Stage 03" in html
    assert "application/vnd.jupyter.widget-view+json" in nb.cells[1].outputs[0].data  # the .ipynb keeps its own


# --- what was read, and how many texts ------------------------------------------------------------

def _settings(tmp_path, *args):
    texts = [f"story number {i} about a cat and a dog" for i in range(400)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return train, load_settings([f"--HF_DATASET={train}", "--EVAL_SHARE=0.1", *args])


def test_a_split_less_file_records_the_file_and_its_hash_share_not_a_split(tmp_path):
    from saekit.activations.data import open_role_texts

    train, settings = _settings(tmp_path, "--EVAL_DATA_LIMIT=200")
    evaluation = open_role_texts(settings, "eval").read()
    assert evaluation.read_from == {"file": str(train), "eval_share": 0.1, "side": "evaluation",
                                    "chosen_by": "document hash"}
    training = open_role_texts(settings, "train")
    assert training.read_from["side"] == "training" and "split" not in training.read_from

    valid = tmp_path / "valid.jsonl"
    valid.write_text(json.dumps({"text": "a story of its own"}))
    _, two_files = _settings(tmp_path, f"--EVAL_DATASET={valid}")
    assert open_role_texts(two_files, "eval").read().read_from == {"file": str(valid)}


def test_fewer_texts_than_asked_are_counted_and_warned_about(tmp_path):
    from saekit.activations.data import open_role_texts

    _, settings = _settings(tmp_path, "--EVAL_DATA_LIMIT=200")
    evaluation = open_role_texts(settings, "eval").read()
    assert 10 < len(evaluation) < 200  # a 10% share of 400 documents
    line = evaluation.summary()
    assert line.startswith(f"{len(evaluation)} texts from {settings.HF_DATASET} (the 10% evaluation share")
    assert f"warning: fewer texts than asked: {len(evaluation)} of 200" in line
    _, enough = _settings(tmp_path, "--EVAL_DATA_LIMIT=10")
    assert "warning" not in open_role_texts(enough, "eval").read().summary()


def test_stage_01_records_what_it_read(smoke_args):
    from conftest import store_of
    from saekit.activations.store import open_run

    meta = open_run(store_of(smoke_args)).meta
    stories = next(a.split("=", 1)[1] for a in smoke_args if a.startswith("--HF_DATASET="))
    assert meta["split"] is None  # a .jsonl has no splits
    assert meta["texts_read"] == {"file": stories, "eval_share": 0.25, "side": "training", "chosen_by": "document hash"}
    assert meta["n_texts_asked"] == 24


def test_the_verdict_names_the_tokens_each_figure_counts():
    heldout = {**SOUND_HELDOUT, "token_set": "the 1200 tokens of the last documents of activation run r1"}
    splice = {"eval_texts_in_training": 0, "ce_clean": 2.42, "ce_sae": 2.45, "ce_mean": 2.56, "delta_ce": 0.03,
              "ce_recovered_vs_mean": 0.78, "n_texts": 97}
    text = verdict.verdict_text(verdict.checks(load_settings([]), 8, heldout, None, splice), heldout, splice, 8)
    assert "latents dead on the 1200 tokens of the last documents of activation run r1" in text
    assert "spliced into the model on 97 evaluation texts ΔCE 0.0300" in text
