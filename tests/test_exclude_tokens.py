"""EXCLUDE_TOKENS: the rows of BOS (and padding, and any ids named) stay out of training, the held-out metrics
and the SAE's splice, from the store and on the fly."""
import numpy as np
import pytest
import torch

from conftest import STORIES, TINY_LAYER


def test_the_stored_rows_of_excluded_tokens_leave_training_and_the_heldout_metrics(smoke_args):
    from saekit.activations.sources import store_rows
    from saekit.activations.store import open_run
    from saekit.base.integrity import read_sealed_json
    from saekit.base.settings import load_settings
    from saekit.training.sae import TopKSAE
    from saekit.training.train import evaluate

    settings = load_settings(smoke_args)
    run = open_run(settings.store)
    bos = run.meta["tokenizer"]["bos_token_id"]
    ids = run.tokens()[:, 0]
    heldout = run.heldout_start(settings.HELDOUT_FRACTION)
    assert (ids == bos).sum() == run.meta["n_documents"]  # one BOS a document
    sae, _ = TopKSAE.load(settings.store / "sae_model" / "topk_sae.pt")
    every = evaluate(sae, run, heldout, run.n_tokens)
    run.exclude_tokens(settings.EXCLUDE_TOKENS)
    assert np.array_equal(run.keep(), ids != bos)
    kept = evaluate(sae, run, heldout, run.n_tokens)
    assert kept.n_tokens == int((ids[heldout:] != bos).sum()) < every.n_tokens
    source = store_rows(settings, run, torch.device("cpu"))
    batches = [batch for batch, _ in source.epoch(0)]
    assert sum(len(b) for b in batches) == source.n_rows == int((ids[:heldout] != bos).sum())
    bos_rows = run.rows(0, heldout)[ids[:heldout] == bos]
    trained = torch.cat(batches).numpy()
    assert not any(np.isclose(trained, row, atol=0).all(1).any() for row in bos_rows[:20])
    # what stage 02 trained on: the same count, every epoch
    history = read_sealed_json(settings.store / "training_history.json", "")
    assert history["history"][-1]["train_tokens"] == source.n_rows


def test_on_the_fly_the_excluded_rows_are_made_and_left_out(tiny_model, tiny_tokenizer):
    from saekit.activations.models import resolve_layer
    from saekit.activations.sources import ModelRows, count_training_texts, rows_dropped

    texts = STORIES
    every, _ = count_training_texts(texts, tiny_tokenizer, 24, 0.25)
    plan, _ = count_training_texts(texts, tiny_tokenizer, 24, 0.25, excluded=frozenset({tiny_tokenizer.bos_token_id}))
    assert plan.n_tokens == every.n_tokens - plan.n_training  # one BOS a training text
    source = ModelRows(tiny_model, tiny_tokenizer, resolve_layer(tiny_model, TINY_LAYER), texts, plan, d=32,
                       max_length=24, forward_batch=2, batch_size=8, buffer_tokens=30, dtype="float32",
                       device=torch.device("cpu"), seed=0, excluded=frozenset({tiny_tokenizer.bos_token_id}))
    assert source.n_rows == plan.n_tokens  # an epoch's remainder too small for a batch is dropped, as everywhere
    assert sum(len(batch) for batch, _ in source.epoch(0)) == plan.n_tokens - rows_dropped(plan.n_tokens, 8)


def test_the_splice_keeps_the_layers_own_output_at_excluded_tokens(tiny_model, tiny_tokenizer):
    from saekit.activations.models import resolve_layer
    from saekit.evaluation.splice import _except_at, splice_metrics

    layer = resolve_layer(tiny_model, TINY_LAYER)
    broken = lambda h: h + 100.0  # noqa: E731 - an SAE that ruins every token it replaces
    mean = torch.zeros(32)
    every = splice_metrics(tiny_model, tiny_tokenizer, layer, STORIES, broken, mean, 24, progress=False)
    bos_kept = splice_metrics(tiny_model, tiny_tokenizer, layer, STORIES, broken, mean, 24, progress=False,
                              kept=frozenset({tiny_tokenizer.bos_token_id}))
    assert bos_kept["delta_ce"] != every["delta_ce"]  # the BOS position kept its own output (random model: any sign)
    h = torch.randn(2, 5, 32)
    at_kept = torch.tensor([[True, False, False, False, False], [True, False, True, False, False]])
    out = _except_at(at_kept, broken)(h)
    assert torch.equal(out[at_kept], h[at_kept]) and torch.equal(out[~at_kept], broken(h)[~at_kept])


@pytest.mark.parametrize("value,ok", [("[]", True), ("['bos', 7]", True), ("['cls']", False), ("[-1]", False)])
def test_exclude_tokens_has_a_rule(value, ok):
    from saekit.base.settings import SettingsError, load_settings

    if ok:
        load_settings([f"--EXCLUDE_TOKENS={value}"])
    else:
        with pytest.raises(SettingsError, match="EXCLUDE_TOKENS="):
            load_settings([f"--EXCLUDE_TOKENS={value}"])
