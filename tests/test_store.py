import numpy as np
import pytest
import torch

from conftest import STORIES, TINY_LAYER
from saekit.activations import models as models_module
from saekit.activations.models import LayerNotFoundError, ModelLoadError, load_model, resolve_layer
from saekit.activations.store import StoreError, check_run_matches, open_run, save_activations


def _save(model, tok, store_dir, texts=STORIES, **kw):
    kw = {"max_length": 16, "batch_size": 3, "dtype": "float32", "shard_tokens": 20,
          "metadata": {"model_id": "tiny"}, "progress": False, **kw}
    return save_activations(model, tok, texts, TINY_LAYER, store_dir, **kw)


def _direct_layer_output(model, tok, text, max_length):
    """The layer's output for one unpadded text, from a full forward with a plain hook."""
    seen = []
    handle = resolve_layer(model, TINY_LAYER).register_forward_hook(lambda m, i, o: seen.append(o))
    enc = tok(text, return_tensors="pt", truncation=True, max_length=max_length)
    with torch.no_grad():
        model(**enc)
    handle.remove()
    return enc.input_ids[0], seen[0][0]


def test_wrong_layer_lists_every_blocks_post_attention_layernorm_and_how_to_list_all(tiny_model):
    with pytest.raises(LayerNotFoundError) as err:
        resolve_layer(tiny_model, "llamaforcausallm_model_layers_9_post_attention_layernorm")
    message = str(err.value)
    for block in range(3):
        assert f"llamaforcausallm_model_layers_{block}_post_attention_layernorm" in message
    assert "--list-layers" in message


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_stored_tokens_and_values_match_a_direct_forward(tmp_path, tiny_model, tiny_tokenizer, dtype, tol):
    run = open_run(_save(tiny_model, tiny_tokenizer, tmp_path, max_length=12, dtype=dtype).parent.parent)
    tokens = run.tokens()
    acts = run.rows(0, run.n_tokens)
    assert run.meta["dtype"] == dtype and acts.dtype == np.float32
    for doc, text in enumerate(STORIES):
        ids, expected = _direct_layer_output(tiny_model, tiny_tokenizer, text, 12)
        rows = tokens[:, 1] == doc
        assert tokens[rows, 0].tolist() == ids.tolist()  # padding excluded, BOS kept
        assert tokens[rows, 2].tolist() == list(range(len(ids)))
        np.testing.assert_allclose(acts[rows], expected.numpy(), rtol=tol, atol=tol)
    assert run.n_tokens == sum(len(tiny_tokenizer(t, truncation=True, max_length=12).input_ids) for t in STORIES)


def test_shards_and_metadata(tmp_path, tiny_model, tiny_tokenizer):
    run_dir = _save(tiny_model, tiny_tokenizer, tmp_path)
    run = open_run(tmp_path)
    assert run.path == run_dir and (tmp_path / "run_id.txt").read_text().strip() == run_dir.name
    assert len(run.meta["shards"]) > 2 and all(s["n_tokens"] == 20 for s in run.meta["shards"][:-1])
    for key in ("model_id", "layer_signature", "tokenizer", "n_tokens", "dtype", "created", "n_documents"):
        assert key in run.meta
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.partial"))


def test_interrupted_run_keeps_the_previous_run(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    first = _save(tiny_model, tiny_tokenizer, tmp_path)
    calls = {"n": 0}
    real_forward = models_module.forward_to_layer

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # in the second window of texts, after the first was written
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(models_module, "forward_to_layer", failing_forward)
    with pytest.raises(KeyboardInterrupt):
        _save(tiny_model, tiny_tokenizer, tmp_path, texts=STORIES * 4, run_id="interrupted")
    assert (tmp_path / "run_id.txt").read_text().strip() == first.name
    assert open_run(tmp_path).path == first
    assert not (tmp_path / "runs" / "interrupted").exists()
    partial = tmp_path / "runs" / "interrupted.partial"
    assert not (partial / "metadata.json").exists()
    # every shard file there is whole: it loads, and the pair agrees on its length
    for acts_file in partial.glob("*.acts.npy"):
        tokens_file = acts_file.with_name(acts_file.name.replace(".acts", ".tokens"))
        assert len(np.load(acts_file)) == len(np.load(tokens_file)) == 20
    assert not list(partial.glob("*.tmp"))


def test_missing_and_mismatched_runs_name_the_stage_to_run(tmp_path, tiny_model, tiny_tokenizer):
    with pytest.raises(StoreError, match="run_id.txt does not exist. Run stage 01"):
        open_run(tmp_path)
    run_dir = _save(tiny_model, tiny_tokenizer, tmp_path)
    run = open_run(tmp_path)
    check_run_matches(run, "tiny", TINY_LAYER)
    with pytest.raises(StoreError, match="layer .* Run stage 01"):
        check_run_matches(run, "tiny", "llamaforcausallm_model_layers_0_post_attention_layernorm")
    with pytest.raises(StoreError, match="model 'tiny'"):
        check_run_matches(run, "other", TINY_LAYER)
    (run_dir / "metadata.json").unlink()
    with pytest.raises(StoreError, match="gone or incomplete.*Run stage 01"):
        open_run(tmp_path)


def test_heldout_split_is_whole_documents(tmp_path, tiny_model, tiny_tokenizer):
    _save(tiny_model, tiny_tokenizer, tmp_path)
    run = open_run(tmp_path)
    start = run.heldout_start(0.25)
    docs = run.tokens()[:, 1]
    assert set(docs[start:]) == {6, 7} and set(docs[:start]) == set(range(6))


def test_local_folder_loads_like_a_hub_id(tiny_model_dir, tiny_model):
    model, tok = load_model(str(tiny_model_dir))
    ids = tok(STORIES[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model(ids).logits)


def test_unloadable_model_says_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="(?s)could not load model.*local folder.*--preset=local"):
        load_model(str(tmp_path / "no-such-model"))


def test_heldout_start_is_the_first_row_of_the_last_documents_across_shards(tmp_path):
    from conftest import make_synthetic_run

    run = make_synthetic_run(tmp_path, n_tokens=3000, shard_tokens=700)  # 50-token documents over 5 shards
    docs = run.tokens()[:, 1]
    for fraction in (0.02, 0.1, 0.25, 0.5, 0.9):
        start = run.heldout_start(fraction)
        n_heldout = max(1, round(run.meta["n_documents"] * fraction))
        assert docs[start] == run.meta["n_documents"] - n_heldout and (start == 0 or docs[start - 1] < docs[start])


def test_the_run_counts_the_texts_cut_at_max_length_and_the_tokens_they_lost(tmp_path, tiny_model, tiny_tokenizer):
    """Texts longer than MAX_LENGTH lost their ends without a word; the run now records how many, and
    what share of their tokens was dropped (stage 01 prints it)."""
    uncut = [len(ids) for ids in tiny_tokenizer(STORIES)["input_ids"]]
    max_length = sorted(uncut)[len(uncut) // 2]  # about half the stories are longer
    run = open_run(_save(tiny_model, tiny_tokenizer, tmp_path, max_length=max_length).parent.parent)
    long = [n for n in uncut if n > max_length]
    dropped = sum(n - max_length for n in long)
    assert long and run.meta["cut_at_max_length"] == {
        "texts": len(long), "their_tokens_dropped": dropped,
        "share_of_their_tokens_dropped": pytest.approx(dropped / sum(long))}
    assert run.n_tokens == sum(min(n, max_length) for n in uncut)
