"""Training on the fly (ACTIVATION_SOURCE = "model"): stage 01 saves only the held-out documents and
stage 02 makes the training rows with the model as it trains, on the tiny model."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, ROUND_OFF, checksums, run_python, run_stage, subprocess_env, with_store

ON_THE_FLY = ["--ACTIVATION_SOURCE=model", "--SHUFFLE_BUFFER_TOKENS=150", "--CHECKPOINT_SECONDS=0"]


def _sae(store: Path):
    from saekit.training.sae import TopKSAE

    return TopKSAE.load(store / "sae_model" / "topk_sae.pt")


def _assert_same_weights(a, b, exact: bool = True) -> None:
    for name, weight in a.state_dict().items():
        if exact:
            assert torch.equal(b.state_dict()[name], weight), name
        else:
            torch.testing.assert_close(b.state_dict()[name], weight, **ROUND_OFF, msg=name)


@pytest.fixture(scope="module")
def online_args(tmp_path_factory, smoke_args) -> list[str]:
    """The smoke settings trained on the fly: stages 01 and 02 run, in a store of their own."""
    args = with_store(smoke_args, tmp_path_factory.mktemp("online") / "store") + ON_THE_FLY
    run_stage("01_save_activations.py", args)
    run_stage("02_train_sae.py", args)
    return args


def _store(args: list[str]) -> Path:
    return Path(next(a.split("=", 1)[1] for a in args if a.startswith("--STORE_DIR=")))


def test_stage_01_saves_only_the_heldout_documents_and_counts_the_rest(online_args, smoke_args):
    from saekit.activations.store import open_run

    online, stored = open_run(_store(online_args)), open_run(_store(smoke_args))
    first_heldout = stored.heldout_start(0.25)
    assert online.meta["rows"] == "heldout"
    stored.exclude_tokens(["bos", "pad"])  # EXCLUDE_TOKENS's default: BOS rows are not trained on
    assert online.meta["training_tokens"] == stored.count_kept(0, first_heldout) < first_heldout  # counted exactly
    assert online.n_tokens == stored.n_tokens - first_heldout  # the held-out rows and nothing else
    assert online.heldout_start(0.25) == 0
    assert (online.document_hashes() == stored.document_hashes()).all()
    torch.testing.assert_close(torch.from_numpy(online.rows(0, online.n_tokens)),
                               torch.from_numpy(stored.rows(first_heldout, stored.n_tokens)), atol=2e-3, rtol=2e-3)


def test_the_sae_and_its_history_say_which_source_trained_them(online_args):
    import json

    from saekit.base.integrity import read_sealed_json

    store = _store(online_args)
    _, meta = _sae(store)
    history = read_sealed_json(store / "training_history.json", "")
    cfg = json.loads((store / "sae_model" / "saelens" / "cfg.json").read_text())
    assert meta["activation_source"] == history["activation_source"] == cfg["metadata"]["activation_source"] == "model"
    assert history["history"][-1]["train_tokens"] + history["rows_dropped_per_epoch"] == read_sealed_json(
        next((store / "runs").glob("*/metadata.json")), "")["training_tokens"]


def test_on_the_fly_with_a_seed_is_deterministic(online_args, tmp_path):
    args = with_store(online_args, tmp_path / "store")
    run_stage("01_save_activations.py", args)
    run_stage("02_train_sae.py", args)
    _assert_same_weights(_sae(_store(online_args))[0], _sae(tmp_path / "store")[0])


def _train(args: list[str], checkpoint: Path, resume: bool = False, stop_at_save: int | None = None):
    from saekit.activations.models import load_model
    from saekit.activations.sources import model_rows
    from saekit.activations.store import open_run
    from saekit.base.settings import load_settings
    from saekit.training.train import TrainConfig, _Checkpoints, train_sae

    settings = load_settings(args)
    model, tokenizer = load_model(settings.MODEL_ID)
    run = open_run(settings.store)
    source = model_rows(settings, run, model, tokenizer, torch.device("cpu"))
    real_save, saves = _Checkpoints.save, []

    def save_then_stop(self, *a, **kw):  # interrupted right after a checkpoint was written
        real_save(self, *a, **kw)
        saves.append(a[3] if len(a) > 3 else kw.get("partial"))
        if len(saves) == stop_at_save:
            raise KeyboardInterrupt

    _Checkpoints.save = save_then_stop
    try:
        return train_sae(run, TrainConfig.from_settings(settings), checkpoint_path=checkpoint, resume=resume,
                         progress=False, source=source), saves
    finally:
        _Checkpoints.save = real_save


@pytest.mark.parametrize("architecture", ["topk", "matryoshka"])
def test_resume_mid_epoch_equals_an_uninterrupted_run(online_args, tmp_path, architecture):
    args = online_args + [f"--ARCHITECTURE={architecture}"]
    (straight, _), saves = _train(args, tmp_path / "a.pt")
    assert type(straight).architecture == architecture
    assert sum(partial is not None for partial in saves) >= 4  # several buffers an epoch: checkpoints mid-epoch
    with pytest.raises(KeyboardInterrupt):  # stopped after the 2nd buffer of epoch 1
        _train(args, tmp_path / "b.pt", stop_at_save=2)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["partial"]["position"]["buffer"] == 2
    (resumed, _), _ = _train(args, tmp_path / "b.pt", resume=True)
    _assert_same_weights(straight, resumed)


def test_two_gloo_processes_equal_one(online_args, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(_store(online_args), store, ignore=shutil.ignore_patterns("sae_model", "models"))
    args = with_store(online_args, store)
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "02_train_sae.py", *args])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "in 2 processes" in proc.stdout
    _assert_same_weights(_sae(_store(online_args))[0], _sae(store)[0], exact=False)


def test_no_heldout_text_is_trained_on(tmp_path, tiny_model, tiny_tokenizer):
    """A training text that is also a held-out one (a duplicate in the dataset) is left out; every
    text trained on is checked against the hash stage 01 recorded for it."""
    from saekit.activations.data import document_hash
    from saekit.activations.models import resolve_layer
    from saekit.activations.sources import ModelRows, count_training_texts
    from saekit.activations.store import StoreError

    from conftest import STORIES, TINY_LAYER

    texts = STORIES[:7] + [STORIES[1], STORIES[7]]  # held out: the last 2, the first of them also in training
    plan, left_out = count_training_texts(texts, tiny_tokenizer, 24, 0.25)
    assert plan.n_training == 7 and left_out == 1
    trained: list[list[int]] = []

    def rows(texts_):
        source = ModelRows(tiny_model, tiny_tokenizer, resolve_layer(tiny_model, TINY_LAYER), texts_, plan,
                           d=32, max_length=24, forward_batch=2, batch_size=8, buffer_tokens=30, dtype="float32",
                           device=torch.device("cpu"), seed=0)
        real = source._rows
        source._rows = lambda docs, carry=None: trained.extend(d.tolist() for d in docs) or real(docs, carry)
        return sum(len(batch) for batch, _ in source.epoch(0))

    assert rows(texts) == plan.n_tokens
    heldout_ids = [tiny_tokenizer(t)["input_ids"] for t in texts[7:]]
    assert len(trained) == 6 and not any(doc in heldout_ids for doc in trained)
    assert {document_hash(t) for t in texts[:7]} - plan.heldout == {document_hash(t) for t in STORIES[:7]
                                                                     if t != STORIES[1]}
    with pytest.raises(StoreError, match="not the one stage 01 read"):  # the dataset changed since stage 01
        rows([STORIES[0], STORIES[2]] + texts[2:])


def test_settings_that_change_the_texts_are_refused(online_args):
    proc = run_python(["02_train_sae.py", *online_args, "--MAX_LENGTH=20"])
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "MAX_LENGTH (stage 01: 24, now 20)" in last


def test_a_store_source_on_a_heldout_only_run_is_refused(online_args):
    proc = run_python(["02_train_sae.py", *online_args, "--ACTIVATION_SOURCE=store"])
    assert proc.returncode == 1
    assert "--ACTIVATION_SOURCE=model" in proc.stderr.strip().splitlines()[-1]


def test_a_killed_run_leaves_the_previous_sae_intact(online_args, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(_store(online_args), store, ignore=shutil.ignore_patterns("models"))
    args = with_store(online_args, store) + ["--EPOCHS=200"]
    before = checksums(store, "checkpoint")
    checkpoint = store / "sae_model" / "checkpoint.pt"
    stamp = checkpoint.stat().st_mtime_ns
    proc = subprocess.Popen([sys.executable, "02_train_sae.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=subprocess_env(),
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while checkpoint.stat().st_mtime_ns == stamp and time.monotonic() < deadline:  # killed mid-training
        time.sleep(0.05)
    assert proc.poll() is None, "stage 02 ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checksums(store, "checkpoint") == before  # the SAE, its history and the SAELens folder as they were


def test_a_model_changed_between_stages_01_and_02_is_refused(tmp_path, smoke_args, tiny_model_dir):
    import shutil

    from transformers import AutoModelForCausalLM

    from saekit.activations.models import weights_changes

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    args = [a for a in with_store(smoke_args, tmp_path / "store") if not a.startswith("--MODEL_ID=")] + \
        ON_THE_FLY + [f"--MODEL_ID={model_dir}"]
    run_stage("01_save_activations.py", args)
    newer = AutoModelForCausalLM.from_pretrained(model_dir)  # a new revision of the weights, same files
    with torch.no_grad():
        newer.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    newer.save_pretrained(model_dir)
    proc = run_python(["02_train_sae.py", *args])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("error: the model's weights changed since stage 01") and \
        "model.safetensors changed" in lines[-1], lines[-1]
    assert not (tmp_path / "store" / "sae_model").exists()
    # a hub model is known by its resolved revision
    assert weights_changes({"revision": "abc"}, {"revision": "def"}) == ["revision abc is now def"]
    assert weights_changes({"revision": "abc"}, {"revision": "abc"}) == []


@pytest.mark.parametrize("remainder", [0, 1, 2])
def test_on_the_fly_an_epochs_last_batch_is_never_a_sliver(tiny_model, tiny_tokenizer, remainder):
    """As from the store: a remainder under half a batch (here 0, 1 or 2 rows) is dropped, so no step
    divides by the variance of one or two rows."""
    from saekit.activations.models import resolve_layer
    from saekit.activations.sources import ModelRows, batches_in_epoch, count_training_texts

    from conftest import STORIES, TINY_LAYER

    plan, _ = count_training_texts(STORIES, tiny_tokenizer, 24, 0.25)
    batch_size = next(b for b in range(8, plan.n_tokens) if plan.n_tokens % b == remainder)
    source = ModelRows(tiny_model, tiny_tokenizer, resolve_layer(tiny_model, TINY_LAYER), STORIES, plan, d=32,
                       max_length=24, forward_batch=2, batch_size=batch_size, buffer_tokens=30, dtype="float32",
                       device=torch.device("cpu"), seed=0)
    sizes = [len(batch) for batch, _ in source.epoch(0)]
    assert sizes == [batch_size] * (plan.n_tokens // batch_size)
    assert len(sizes) == batches_in_epoch(plan.n_tokens, batch_size)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_forward_batchs_rows_land_in_place_with_one_indexed_copy(tiny_model, tiny_tokenizer, padding_side):
    """write_document_activations moves every real token's row of a batch at once (host-made indices, no
    per-document copy): each document's rows are those of its own row of the padded forward, in order."""
    import copy

    from saekit.activations.models import (forward_to_layer, length_sorted_batches, resolve_layer,
                                           write_document_activations)

    from conftest import STORIES, TINY_LAYER

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.padding_side = padding_side
    layer = resolve_layer(tiny_model, TINY_LAYER)
    docs = tokenizer(STORIES + [""], truncation=True, max_length=24)["input_ids"]
    docs[-1] = []  # a text the tokenizer makes nothing of has no rows
    lengths = [len(doc) for doc in docs]
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    batches = length_sorted_batches(lengths, 3)
    out = torch.full((offsets[-1], 32), float("nan"), dtype=torch.float16)
    write_document_activations(out, offsets, tiny_model, tokenizer, layer, docs, batches)
    for batch in batches:
        batch = [i for i in batch if docs[i]]
        padded = tokenizer.pad({"input_ids": [docs[i] for i in batch]}, return_tensors="pt")
        hidden = forward_to_layer(tiny_model, layer, padded["input_ids"], padded["attention_mask"])
        for row, i in enumerate(batch):
            assert torch.equal(out[offsets[i]:offsets[i + 1]], hidden[row][padded["attention_mask"][row].bool()].half())


def test_forward_batches_by_tokens_hold_what_fits_padded_and_every_text_once():
    from saekit.activations.models import length_sorted_batches

    lengths = [5, 30, 7, 7, 12, 3, 40, 9, 9, 11]
    batches = length_sorted_batches(lengths, 2, max_tokens=32)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(flat)  # neighbours in length share a batch
    for batch in batches:  # within the budget, padding included, or a text too long for it alone
        assert len(batch) * max(lengths[i] for i in batch) <= 32 or len(batch) == 1
    assert [[lengths[i] for i in b] for b in batches] == [[3, 5, 7, 7], [9, 9], [11, 12], [30], [40]]
    assert length_sorted_batches([], 2, max_tokens=32) == [] == length_sorted_batches([], 2)


def test_the_rows_on_the_fly_do_not_depend_on_the_forward_batch(tiny_model, tiny_tokenizer):
    """Texts a batch or tokens a batch (FORWARD_BATCH_TOKENS), the same rows in the same batches: equal
    to float32 round-off, which another padding's kernel shapes change (measured: at most 3.6e-7 at
    values up to 3.6), and the memory check counts the largest forward batch."""
    from saekit.activations.models import resolve_layer
    from saekit.activations.sources import ModelRows, count_training_texts
    from saekit.base.memory import forward_parts

    from conftest import STORIES, TINY_LAYER

    texts = STORIES * 3
    plan, _ = count_training_texts(texts, tiny_tokenizer, 24, 0.25)

    def source(**forward) -> ModelRows:
        return ModelRows(tiny_model, tiny_tokenizer, resolve_layer(tiny_model, TINY_LAYER), texts, plan, d=32,
                         max_length=24, batch_size=8, buffer_tokens=120, dtype="float32", device=torch.device("cpu"),
                         seed=0, **forward)

    one = [batch for batch, _ in source(forward_batch=1).epoch(0)]
    for forward in ({"forward_batch": 16}, {"forward_batch": 1, "forward_tokens": 70},
                    {"forward_batch": 1, "forward_tokens": 10_000}):
        batches = [batch for batch, _ in source(**forward).epoch(0)]
        assert len(batches) == len(one)
        for a, b in zip(batches, one):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    counted = source(forward_batch=1, forward_tokens=70).memory_parts()["a forward batch's activations"]
    assert counted == forward_parts(tiny_model, 70, 24)["a forward batch's activations"]
    alone = source(forward_batch=1, forward_tokens=10).memory_parts()["a forward batch's activations"]
    assert alone == forward_parts(tiny_model, 24, 24)["a forward batch's activations"]  # a long text runs alone


def test_forward_batch_tokens_by_default_sizes_a_gpus_batches_by_tokens_and_a_cpus_by_texts():
    from saekit.activations.sources import CUDA_FORWARD_BATCH_TOKENS, forward_batch_tokens

    assert forward_batch_tokens(0, torch.device("cuda")) == CUDA_FORWARD_BATCH_TOKENS
    assert forward_batch_tokens(0, torch.device("cpu")) == 0  # BATCH_SIZE_SAVE texts a batch, as stage 01
    assert forward_batch_tokens(500, torch.device("cpu")) == forward_batch_tokens(500, torch.device("cuda")) == 500


def test_tokenising_in_the_background_gives_the_same_buffers_and_positions(tiny_model, tiny_tokenizer):
    """ModelRows tokenises and hashes the texts in a thread of its own, a window ahead: the buffers, their
    documents in order and the positions after them are those made on the training thread, from the
    start and from a position mid-epoch."""
    import threading

    from saekit.activations.models import resolve_layer
    from saekit.activations.sources import ModelRows, count_training_texts

    from conftest import STORIES, TINY_LAYER

    texts = STORIES * 3
    plan, _ = count_training_texts(texts, tiny_tokenizer, 24, 0.25)
    threads = set()

    class Recording:  # the tokenizer, noting which thread calls it
        def __getattr__(self, name):
            return getattr(tiny_tokenizer, name)

        def __call__(self, *args, **kwargs):
            threads.add(threading.get_ident())
            return tiny_tokenizer(*args, **kwargs)

    def buffers(background: bool, position=None) -> list:
        source = ModelRows(tiny_model, Recording(), resolve_layer(tiny_model, TINY_LAYER), texts, plan, d=32,
                           max_length=24, forward_batch=2, batch_size=8, buffer_tokens=30, dtype="float32",
                           device=torch.device("cpu"), seed=0, background=background)
        return [([doc.tolist() for doc in docs], after, last) for docs, after, last in source._buffers(1, position)]

    here = buffers(False)
    assert threads == {threading.get_ident()}
    threads.clear()
    assert buffers(True) == here and len(here) > 3
    assert threads and threading.get_ident() not in threads
    middle = here[2][1]
    assert buffers(True, middle) == buffers(False, middle) == here[3:]


def test_a_changed_text_met_in_the_background_is_the_same_one_line_error(tmp_path, smoke_args):
    """The StoreError for a text that is not the one stage 01 read is raised in the tokenising thread,
    and stage 02 reports it as it would from the training thread: one line, no traceback."""
    import json

    stories = tmp_path / "stories.jsonl"
    args = [a for a in with_store(smoke_args, tmp_path / "store") if not a.startswith("--HF_DATASET=")]
    args += ON_THE_FLY + [f"--HF_DATASET={stories}"]
    original = Path(next(a.split("=", 1)[1] for a in smoke_args if a.startswith("--HF_DATASET=")))
    texts = [json.loads(line)["text"] for line in original.read_text().splitlines()]
    stories.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    run_stage("01_save_activations.py", args)
    stories.write_text("\n".join(json.dumps({"text": t + (" again" if i == 5 else "")}) for i, t in enumerate(texts)))
    proc = run_python(["02_train_sae.py", *args])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("error: training text ") and "is not the one stage 01 read" in lines[-1], lines[-1]
