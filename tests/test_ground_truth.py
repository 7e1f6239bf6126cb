"""Ground-truth scores (saekit.evaluation.ground_truth): on activations made from a known dictionary,
a trained SAE recovers most features and a broken one does not."""
from dataclasses import replace

import pytest
import torch

from saekit.activations.store import RunWriter, open_run
from saekit.base.settings import load_settings
from saekit.evaluation.ground_truth import score_against_truth, synthetic_activations
from saekit.training.sae import TopKSAE
from saekit.training.train import TrainConfig, train_sae

D, N_FEATURES, ACTIVE = 16, 32, 3  # twice as many features as dimensions: superposition


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A store of 8,000 tokens made from the known features, and an SAE trained on it."""
    # not seed 0: the SAE's initialisation draws its decoder rows from torch.randn with SEED 0, and would
    # start with the true features as its first rows (MCC 1.0 untrained)
    x, features, codes = synthetic_activations(8000, D, N_FEATURES, ACTIVE, seed=1)
    store = tmp_path_factory.mktemp("truth")
    writer = RunWriter(store, "synthetic", D, "float32", 2000)
    docs = torch.arange(len(x)) // 50
    writer.add(x, torch.zeros(len(x), dtype=torch.long), docs, torch.arange(len(x)) % 50)
    writer.finish({"model_id": "synthetic", "layer_signature": "synthetic", "n_documents": int(docs[-1]) + 1})
    run = open_run(store)
    cfg = replace(TrainConfig.from_settings(load_settings([])), n_latents_multiplier=2, k=ACTIVE, epochs=12,
                  batch_size=128, lr=1e-2, warmup_steps=10, heldout_fraction=0.2, shuffle_buffer_tokens=2048)
    sae, record = train_sae(run, cfg, progress=False)
    start = record["heldout_start_row"]
    return sae, record, x[start:], features, codes[start:]


@pytest.mark.slow  # ~40 s of training on 2 cores; make test-all runs it
def test_a_trained_sae_recovers_most_features_and_broken_ones_do_not(made):
    sae, record, x, features, codes = made
    trained = score_against_truth(sae, x, features, codes)
    untrained = TopKSAE(D, sae.n_latents, sae.k)  # its initialisation: random unit decoder rows, tied encoder
    untrained.load_state_dict({**sae.state_dict(), "W_enc": record["init"]["W_enc"], "W_dec": record["init"]["W_dec"]})
    random_decoder = TopKSAE(D, sae.n_latents, sae.k)  # the trained encoder, a random decoder
    random_decoder.load_state_dict({**sae.state_dict(), "W_dec": torch.nn.functional.normalize(
        torch.randn(sae.n_latents, D, generator=torch.Generator().manual_seed(2)), dim=1)})
    broken = [score_against_truth(s.eval(), x, features, codes) for s in (untrained, random_decoder)]
    # measured (AMD EPYC, 12 epochs): trained MCC 0.89, F1 0.72, variance explained 0.88; untrained MCC 0.54,
    # F1 0.14; random decoder MCC 0.54, F1 0.12
    assert trained.mcc > 0.8 and trained.f1 > 0.6 and trained.variance_explained > 0.8 and trained.l0 == ACTIVE
    for scores in broken:
        assert scores.mcc < 0.65 and scores.f1 < 0.3


def test_mcc_pairs_latents_and_features_one_to_one_whatever_their_order_and_sign():
    x, features, codes = synthetic_activations(500, D, N_FEATURES, ACTIVE, seed=1)
    sae = TopKSAE(D, 2 * N_FEATURES, ACTIVE)
    other = torch.nn.functional.normalize(torch.randn(N_FEATURES, D, generator=torch.Generator().manual_seed(5)), dim=1)
    with torch.no_grad():  # the true features, shuffled and some negated, among as many other rows
        sae.W_dec.copy_(torch.cat([other, features[torch.randperm(N_FEATURES)] * torch.where(
            torch.arange(N_FEATURES) % 2 == 0, 1.0, -1.0)[:, None]]))
        sae.W_enc.copy_(sae.W_dec)
    assert score_against_truth(sae.eval(), x, features, codes).mcc == pytest.approx(1.0)
    with torch.no_grad():
        sae.W_dec[N_FEATURES:] = sae.W_dec[N_FEATURES]  # every feature's row now the same one: one pair can match
    assert score_against_truth(sae.eval(), x, features, codes).mcc < 0.7
