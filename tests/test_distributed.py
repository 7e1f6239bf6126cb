"""Stages under torchrun with 2 processes on the CPU (gloo), on the tiny model: the same results as
one process."""
from __future__ import annotations


import numpy as np
import torch

from conftest import ROUND_OFF, copy_store, run_python, store_of, torchrun, with_store

METRICS_AGREE = 1e-4


def test_stage_01_on_two_processes_stores_the_same_rows_in_the_same_order(tmp_path, smoke_args):
    from saekit.activations.store import open_run

    torchrun(["01_save_activations.py"], with_store(smoke_args, tmp_path / "store"))
    single, double = open_run(store_of(smoke_args)), open_run(tmp_path / "store")
    assert double.meta["processes"] == 2 and len(double.meta["shards"]) >= 2
    assert double.n_tokens == single.n_tokens and double.meta["n_documents"] == single.meta["n_documents"]
    np.testing.assert_array_equal(double.tokens(), single.tokens())
    np.testing.assert_array_equal(double.document_hashes(), single.document_hashes())
    # float16 storage: a batch of other texts may round the last bit of a value differently
    np.testing.assert_allclose(double.rows(0, double.n_tokens), single.rows(0, single.n_tokens), atol=2e-3, rtol=2e-3)


def test_stage_02_on_two_processes_matches_one_process(tmp_path, smoke_args):
    from saekit.base.integrity import read_sealed_json
    from saekit.training.sae import TopKSAE

    store = tmp_path / "store"
    assert "in 2 processes" in torchrun(["02_train_sae.py"], copy_store(smoke_args, store)).stdout
    single, _ = TopKSAE.load(store_of(smoke_args) / "sae_model" / "topk_sae.pt")
    double, _ = TopKSAE.load(store / "sae_model" / "topk_sae.pt")
    for name, weight in single.state_dict().items():
        torch.testing.assert_close(double.state_dict()[name], weight, **ROUND_OFF, msg=name)
    one = read_sealed_json(store_of(smoke_args) / "training_history.json", "")["history"][-1]
    two = read_sealed_json(store / "training_history.json", "")["history"][-1]
    for key in ("train_loss", "heldout_fvu", "heldout_l0", "heldout_dead"):
        assert abs(one[key] - two[key]) <= METRICS_AGREE * max(1.0, abs(one[key])), (key, one[key], two[key])


def test_stage_04_on_two_processes_publishes_the_same_concepts(tmp_path, smoke_args):
    from saekit.concepts.exports import open_concepts
    from saekit.training.sae import TopKSAE

    single_store, double_store = tmp_path / "single", tmp_path / "double"
    one = run_python(["-m", "saekit.concepts.runner", *copy_store(smoke_args, single_store, "concepts*")])
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun(["-m", "saekit.concepts.runner"], copy_store(smoke_args, double_store, "concepts*"))
    _, meta = TopKSAE.load(single_store / "sae_model" / "topk_sae.pt")
    single, single_texts, _ = open_concepts(single_store, meta["sae_id"])
    double, double_texts, _ = open_concepts(double_store, meta["sae_id"])
    assert double_texts == single_texts
    assert double["latents"] == single["latents"]  # codes joined in order: labels, scores and examples all equal
    for key in ("n_texts", "n_tokens", "live_latents"):
        assert double["meta"][key] == single["meta"][key]


def test_a_run_interrupted_in_one_process_resumes_in_two_to_the_same_sae(tmp_path, smoke_args):
    import pytest

    from saekit.activations.sources import store_rows
    from saekit.activations.store import open_run
    from saekit.base.settings import load_settings
    from saekit.training.sae import TopKSAE
    from saekit.training.train import TrainConfig, train_sae

    store = tmp_path / "store"
    args = copy_store(smoke_args, store, "sae_model")

    def stop_after_first_epoch(record):  # called before the epoch's checkpoint: epoch 1's is the last written
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    settings = load_settings(args)
    run = open_run(store)
    run.exclude_tokens(settings.EXCLUDE_TOKENS)  # the rows stage 02 trains on, as 02_train_sae.py reads them
    with pytest.raises(KeyboardInterrupt):
        train_sae(run, TrainConfig.from_settings(settings), source=store_rows(settings, run, torch.device("cpu")),
                  checkpoint_path=store / "sae_model" / "checkpoint.pt", progress=False, on_epoch=stop_after_first_epoch)
    assert "resuming after epoch 1" in torchrun(["02_train_sae.py"], args + ["--resume"]).stdout
    uninterrupted, _ = TopKSAE.load(store_of(smoke_args) / "sae_model" / "topk_sae.pt")
    resumed, _ = TopKSAE.load(store / "sae_model" / "topk_sae.pt")
    for name, weight in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], weight, **ROUND_OFF, msg=lambda m: f"{name}: {m}")


def test_a_mistake_under_torchrun_is_printed_once_and_ends_torchruns_report(tmp_path):
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "02_train_sae.py",
                       "--EPOCHS=0", f"--STORE_DIR={tmp_path / 'store'}"])
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert [line for line in lines if line.startswith("error: ")] == ["error: EPOCHS=0 must be at least 1"], proc.stderr
    # torchrun's own report cannot be silenced; its reason for every failed process is the same line
    reasons = [line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("traceback :")]
    assert reasons and set(reasons) == {"error: EPOCHS=0 must be at least 1"}, proc.stderr[-3000:]
    assert [line for line in lines if line.strip()][-2].strip() == "traceback : error: EPOCHS=0 must be at least 1"
