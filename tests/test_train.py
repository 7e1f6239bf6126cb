from copy import deepcopy
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import make_synthetic_run
from saekit.base.distributed import World
from saekit.activations.sources import StoreRows, smallest_last_batch
from saekit.base.settings import load_settings
from saekit.training.sae import TopKSAE
from saekit.training.train import TrainConfig, TrainingDiverged, auxk_loss, evaluate, train_sae

SMALL = dict(n_latents_multiplier=4, k=3, epochs=4, batch_size=128, lr=3e-3, warmup_steps=10,
             heldout_fraction=0.2, shuffle_buffer_tokens=2048)


def _cfg(**overrides) -> TrainConfig:
    """config.py's training settings, sized down for the synthetic runs."""
    return replace(TrainConfig.from_settings(load_settings([])), **{**SMALL, **overrides})


def test_trains_on_sparse_synthetic_data(tmp_path):
    run = make_synthetic_run(tmp_path, dtype="float16")
    sae, record = train_sae(run, _cfg(epochs=8), progress=False)
    last = record["history"][-1]
    assert last["heldout_fvu"] < 0.2 and last["heldout_l0"] <= 3
    fvus = [h["heldout_fvu"] for h in record["history"]]
    assert all(a >= b - 1e-3 for a, b in zip(fvus, fvus[1:]))  # held-out FVU falls every epoch (to within noise)
    # the returned SAE works on raw activations: its own held-out FVU matches the history's
    stats = evaluate(sae, run, record["heldout_start_row"], run.n_tokens)
    assert abs(stats.fvu - last["heldout_fvu"]) < 1e-4
    assert len(record["latent_frequency"]) == 64
    assert not torch.equal(record["init"]["W_enc"], sae.W_enc.detach())


def test_checks_between_epochs_choose_as_the_steps_do_and_the_last_in_float32(tmp_path, monkeypatch):
    """With SELECT_DTYPE = bfloat16 the held-out checks between epochs take its proposals (as cheap
    as the steps' choice); the last check, whose frequencies the record keeps, and the returned SAE
    choose in float32."""
    import saekit.training.train as train_module
    seen = []

    def spying_evaluate(sae, *args, **kwargs):
        seen.append(sae.select_dtype)
        return evaluate(sae, *args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", spying_evaluate)
    run = make_synthetic_run(tmp_path, dtype="float16")
    sae, record = train_sae(run, _cfg(epochs=3, select_dtype="bfloat16"), progress=False)
    assert seen == [torch.bfloat16, torch.bfloat16, torch.float32]
    assert sae.select_dtype == torch.float32
    stats = evaluate(sae, run, record["heldout_start_row"], run.n_tokens)
    assert abs(stats.fvu - record["history"][-1]["heldout_fvu"]) < 1e-4
    assert stats.frequencies.tolist() == pytest.approx(record["latent_frequency"])


def test_batchtopk_trains_and_its_threshold_gives_about_k_latents_at_inference(tmp_path):
    run = make_synthetic_run(tmp_path)
    sae, record = train_sae(run, _cfg(epochs=8, architecture="batchtopk"), progress=False)
    last = record["history"][-1]
    assert type(sae).__name__ == "BatchTopKSAE" and float(sae.threshold.min()) > 0
    assert last["heldout_fvu"] < 0.2 and abs(last["heldout_l0"] - 3) < 0.3 * 3


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_batchtopk_under_torchrun_is_refused_before_training(tmp_path, architecture):
    from saekit.base.errors import PipelineError

    with pytest.raises(PipelineError, match=f"ARCHITECTURE='{architecture}' trains in one process"):
        train_sae(make_synthetic_run(tmp_path), _cfg(architecture=architecture), progress=False, world=World(0, 2, 0))


def _prefix_fvu(sae, run, start: int, end: int) -> float:
    """Held-out FVU of the SAE's first `end` latents alone (inference codes)."""
    x = torch.from_numpy(np.concatenate(list(run.iter_rows(start, run.n_tokens, 4096)))).float()
    with torch.no_grad():
        values, indices = sae.encode(x)
        error = x - sae.decode(values * (indices < end), indices)
    return float(error.pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_matryoshka_trains_its_prefixes_to_reconstruct_alone(tmp_path):
    """The loss is the mean of the prefixes' FVUs, and it shows: the first groups of a Matryoshka SAE
    reconstruct the held-out rows far better alone than the same latents of a BatchTopK SAE trained
    on the same batches, while the whole SAE stays about as good."""
    from saekit.training.train import _Trainer

    run = make_synthetic_run(tmp_path)
    cfg = _cfg(architecture="matryoshka")
    trainer = _Trainer(cfg, run.d_model, 4000, torch.device("cpu"), World())
    assert trainer.sae.prefix_ends == (2, 6, 14, 30, 64)  # config.py's fractions of 4 x 16 latents
    batch = torch.from_numpy(np.concatenate(list(run.iter_rows(0, 128, 128))))
    trainer.initialise(batch)
    reference = deepcopy(trainer.sae)
    loss, fvu = trainer.step(batch, 1)
    x = batch.float() * trainer.scale
    with torch.no_grad():
        fvus = [float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
                for r in reference.prefix_reconstructions(reference.codes(x))]
    assert float(loss) == pytest.approx(sum(fvus) / len(fvus), rel=1e-5) and float(fvu) == pytest.approx(fvus[-1], rel=1e-5)

    matryoshka, record = train_sae(run, cfg, progress=False)
    batchtopk, batchtopk_record = train_sae(run, replace(cfg, architecture="batchtopk"), progress=False)
    start = record["heldout_start_row"]
    assert type(matryoshka).__name__ == "MatryoshkaSAE" and abs(record["history"][-1]["heldout_l0"] - 3) < 0.3 * 3
    # measured after 4 epochs: prefixes of 6 and 14 latents 0.78 and 0.61 against BatchTopK's 0.91 and 0.75;
    # the whole SAEs 0.29 and 0.27 (the synthetic features have no hierarchy for the prefixes to win on)
    for end in (6, 14):
        assert _prefix_fvu(matryoshka, run, start, end) < 0.9 * _prefix_fvu(batchtopk, run, start, end)
    assert record["history"][-1]["heldout_fvu"] < 1.2 * batchtopk_record["history"][-1]["heldout_fvu"]


@pytest.mark.parametrize("k_aux", [3, 6, 50], ids=["some-dead", "all-dead-exactly", "all-dead"])
def test_auxk_is_the_top_k_aux_dead_latents_reconstructing_the_residual(k_aux):
    torch.manual_seed(0)
    sae = TopKSAE(12, 40, 4)
    sae.init_weights(torch.zeros(12), torch.Generator().manual_seed(0))
    x, residual = torch.randn(32, 12), torch.randn(32, 12)
    dead = torch.tensor([1, 5, 7, 20, 33, 39])
    pre = (x - sae.b_dec) @ sae.W_enc[dead].T + sae.b_enc[dead]  # dense reference over the dead latents
    top = pre.topk(min(k_aux, len(dead)), dim=-1)
    codes = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    expected = ((codes @ sae.W_dec[dead] - residual) ** 2).sum() / 7.0
    torch.testing.assert_close(auxk_loss(sae, x, residual, dead, k_aux, torch.tensor(7.0)), expected)


def _rows(run, start, stop, batch_size, buffer_tokens, prefetch=True):
    return StoreRows(run, start, stop, batch_size, buffer_tokens, torch.device("cpu"), seed=0, prefetch=prefetch)


def _epoch(source, epoch):
    return torch.cat([batch for batch, _ in source.epoch(epoch)]).numpy()


def test_shuffled_batches_cover_every_row_once_and_differ_between_epochs(tmp_path):
    run = make_synthetic_run(tmp_path, n_tokens=3000)
    all_rows = run.rows(0, 2500)
    orders = []
    for epoch in range(2):
        batches = [batch.numpy() for batch, _ in _rows(run, 0, 2500, 100, 700).epoch(epoch)]
        seen = np.concatenate(batches)
        assert len(seen) == 2500 and all(len(b) == 100 for b in batches)
        assert np.array_equal(np.sort(seen, axis=0), np.sort(all_rows, axis=0))
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])


@pytest.mark.parametrize("prefetch", [False, True])
def test_streaming_holds_a_bounded_number_of_buffers(tmp_path, prefetch):
    """Without prefetch a buffer's steps run while the next is on the device (two held); with it, one
    more waits in host memory and one more is being read (four at most)."""
    run = make_synthetic_run(tmp_path, n_tokens=6000)
    read = {"rows": 0}
    real_rows = run.rows

    def counting_rows(start, stop, dtype=np.float32, with_target=False):
        read["rows"] += stop - start
        return real_rows(start, stop, dtype, with_target)

    run.rows = counting_rows
    yielded, held = 0, []
    for batch, _ in _rows(run, 0, 6000, 64, 1024, prefetch).epoch(0):
        yielded += len(batch)
        held.append(read["rows"] - yielded)
    assert yielded == 6000 and max(held) <= (4 if prefetch else 2) * 1024 + 64


@pytest.mark.parametrize("excluded", [[], [(700, 900), (3000, 3050)]])
def test_prefetch_gives_the_same_batches_and_positions_and_resumes_to_them(tmp_path, excluded):
    """Reading ahead in a background thread changes when rows are read, never which batches come
    out, in which order, or the positions a checkpoint records; resumed mid-epoch, it continues to
    the same batches."""
    run = make_synthetic_run(tmp_path, n_tokens=6000)

    def batches(prefetch, epoch, position=None):
        source = StoreRows(run, 0, 5000, 64, 1024, torch.device("cpu"), 0, excluded, prefetch=prefetch)
        return [(batch.clone(), pos) for batch, pos in source.epoch(epoch, position)]

    for epoch in range(2):
        plain, ahead = batches(False, epoch), batches(True, epoch)
        assert len(plain) == len(ahead) > 16
        for (a, pa), (b, pb) in zip(plain, ahead):
            assert torch.equal(a, b) and (pa is None) == (pb is None)
            if pa is not None:
                assert pa["buffer"] == pb["buffer"] and torch.equal(pa["carry"], pb["carry"])
    at = next(i for i, (_, pos) in enumerate(plain) if pos is not None and pos["buffer"] == 2)
    resumed = batches(True, 1, plain[at][1])
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, plain[at + 1:])) and len(resumed) == len(plain) - at - 1


def test_a_read_error_in_the_background_stops_training_with_its_own_message(tmp_path):
    from saekit.base.integrity import IntegrityError

    run = make_synthetic_run(tmp_path, n_tokens=6000)
    real_rows = run.rows

    calls = []

    def failing_rows(start, stop, dtype=np.float32, with_target=False):
        calls.append(start)
        if len(calls) > 32:  # the third buffer's first chunk (16 chunks of 64 rows a buffer)
            raise IntegrityError("shard 3 is corrupt. Run stage 01 again")
        return real_rows(start, stop, dtype)

    run.rows = failing_rows
    seen = 0
    with pytest.raises(IntegrityError, match="shard 3 is corrupt"):
        for batch, _ in _rows(run, 0, 6000, 64, 1024).epoch(0):
            seen += len(batch)
    assert seen >= 1024  # the buffers read before it were trained on


def test_a_range_that_fits_the_buffer_is_read_once_and_reshuffled_every_epoch(tmp_path):
    run = make_synthetic_run(tmp_path, n_tokens=3000)
    reads = []
    real_rows = run.rows

    def counting_rows(start, stop, dtype=np.float32, with_target=False):
        reads.append((start, stop))
        return real_rows(start, stop, dtype, with_target)

    run.rows = counting_rows
    source = _rows(run, 0, 2496, 64, 4096)  # 39 full batches
    epochs = [_epoch(source, epoch) for epoch in range(3)]
    assert reads == [(0, 2496)]
    for seen in epochs:
        assert np.array_equal(np.sort(seen, axis=0), np.sort(real_rows(0, 2496, seen.dtype), axis=0))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


@pytest.mark.parametrize("architecture", ["topk", "matryoshka"])
def test_resume_reaches_the_same_result_as_an_uninterrupted_run(tmp_path, architecture):
    run = make_synthetic_run(tmp_path)
    cfg = _cfg(architecture=architecture)
    straight, straight_record = train_sae(run, cfg, checkpoint_path=tmp_path / "a.pt", progress=False)

    short = _cfg(architecture=architecture)
    stop_after = 2

    def interrupt(record):
        if record["epoch"] == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(run, short, checkpoint_path=tmp_path / "b.pt", progress=False, on_epoch=interrupt)
    resumed, resumed_record = train_sae(run, short, checkpoint_path=tmp_path / "b.pt", resume=True, progress=False)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(straight, name), getattr(resumed, name)), name
    assert [h["heldout_fvu"] for h in straight_record["history"]] == [h["heldout_fvu"] for h in resumed_record["history"]]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    run = make_synthetic_run(tmp_path)
    train_sae(run, _cfg(epochs=1), checkpoint_path=tmp_path / "c.pt", progress=False)
    with pytest.raises(Exception, match="other settings"):
        train_sae(run, _cfg(epochs=1, k=2), checkpoint_path=tmp_path / "c.pt",
                  resume=True, progress=False)


def test_a_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = make_synthetic_run(tmp_path)
    real = StoreRows.epoch

    def poisoned(self, epoch, position=None):
        for batch, after in real(self, epoch, position):
            if epoch == 1:
                batch = batch.clone()
                batch[0, 0] = np.nan
            yield batch, after

    monkeypatch.setattr(StoreRows, "epoch", poisoned)
    ckpt = tmp_path / "d.pt"
    with pytest.raises(TrainingDiverged, match="(?s)became nan at epoch 2.*last good checkpoint \\(after epoch 1\\)"):
        train_sae(run, _cfg(), checkpoint_path=ckpt, progress=False)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 0 and all(torch.isfinite(v).all() for v in saved["sae"].values())


def test_training_never_reads_a_heldout_row(tmp_path, monkeypatch):
    """The held-out documents are the last HELDOUT_FRACTION of them, whole: every row training draws (its batches
    and the sample that sets b_dec and the input scale) comes from before them, and every earlier row is drawn."""
    n_docs, fraction, marker = 120, 0.2, 1e4
    first_heldout_row = 50 * (n_docs - round(n_docs * fraction))  # documents of 50 rows

    def plant(x, docs):  # a value no real row has, in every held-out row
        x[docs >= n_docs - round(n_docs * fraction), 0] = marker

    run = make_synthetic_run(tmp_path, n_tokens=50 * n_docs, edit_rows=plant)
    batches, samples = [], []
    epoch, sample = StoreRows.epoch, StoreRows.sample

    def watched_epoch(self, *args, **kwargs):
        for batch, position in epoch(self, *args, **kwargs):
            batches.append(batch.float())
            yield batch, position

    def watched_sample(self):
        samples.append(sample(self).float())
        return samples[-1]

    monkeypatch.setattr(StoreRows, "epoch", watched_epoch)
    monkeypatch.setattr(StoreRows, "sample", watched_sample)
    cfg = _cfg(epochs=1, heldout_fraction=fraction)
    train_sae(run, cfg, progress=False)
    assert samples and batches
    assert (torch.cat(samples + batches)[:, 0] < marker / 2).all(), "training drew a held-out row"
    # one epoch draws every training row once (a remainder short of a batch may wait for the next epoch)
    assert first_heldout_row - cfg.batch_size < sum(map(len, batches)) <= first_heldout_row


def test_auxk_revives_latents_that_training_without_it_leaves_dead(tmp_path, monkeypatch):
    """Half the latents start with their encoder rows shrunk 100x: they never win a TopK slot, so the main loss
    never reaches them. AuxK trains the dead ones on what the live ones miss, until they win slots again."""
    import saekit.training.train as train_module

    initialise = train_module._Trainer.initialise

    def weakened(self, sample):
        initialise(self, sample)
        with torch.no_grad():
            self.sae.W_enc[:self.n_latents // 2] *= 0.01

    monkeypatch.setattr(train_module._Trainer, "initialise", weakened)
    run = make_synthetic_run(tmp_path)
    dead = {}
    for coef in (0.0, 1 / 32):
        _, record = train_sae(run, _cfg(epochs=4, auxk_coef=coef), progress=False)
        frequency = torch.tensor(record["latent_frequency"])
        weak = frequency[:len(frequency) // 2]
        dead[coef] = int((weak == 0).sum())
    assert dead[0.0] == len(weak)  # without AuxK every weakened latent stays dead
    assert dead[1 / 32] <= len(weak) // 2, dead  # with it, most come back (measured: 10 of 32 still dead)


@pytest.mark.parametrize("remainder", [0, 1, 2, 63, 64])
@pytest.mark.parametrize("buffer_tokens", [4096, 700], ids=["resident", "streamed"])
def test_an_epochs_last_batch_is_never_smaller_than_half_a_batch(tmp_path, remainder, buffer_tokens):
    """A remainder below half a batch is dropped (different rows each epoch); one row alone has zero
    variance, and the loss, divided by it, would be infinite."""
    run = make_synthetic_run(tmp_path, n_tokens=3000)
    source = _rows(run, 0, 20 * 128 + remainder, 128, buffer_tokens)
    kept = remainder >= smallest_last_batch(128)
    epochs = [[batch.numpy() for batch, _ in source.epoch(epoch)] for epoch in range(2)]
    for batches in epochs:
        assert [len(b) for b in batches] == [128] * 20 + ([remainder] if kept else [])
    if remainder and not kept:  # the rows left out differ between epochs
        assert not np.array_equal(*(np.sort(np.concatenate(b), axis=0) for b in epochs))


@pytest.mark.parametrize("remainder", [0, 1, 2])
def test_training_rows_that_leave_a_remainder_of_0_1_or_2_train_to_a_finite_sae(tmp_path, remainder):
    run = make_synthetic_run(tmp_path)
    source = _rows(run, 0, 30 * 128 + remainder, 128, 2048)
    sae, record = train_sae(run, _cfg(epochs=2), progress=False, source=source)
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    assert [h["train_tokens"] for h in record["history"]] == [30 * 128] * 2
    assert record["rows_dropped_per_epoch"] == remainder


def test_too_few_rows_for_a_batch_is_one_clear_error(tmp_path):
    from saekit.base.errors import PipelineError

    run = make_synthetic_run(tmp_path)
    with pytest.raises(PipelineError, match="lower BATCH_SIZE_TRAIN to at most 40"):
        train_sae(run, _cfg(), progress=False, source=_rows(run, 0, 40, 128, 2048))


def test_weights_that_diverge_between_read_backs_are_never_returned(tmp_path, monkeypatch):
    """On a GPU the loss is read back every SYNC_EVERY steps only: a NaN after the last read-back must
    still stop training before the SAE is returned (and saved)."""
    import saekit.training.train as train_module

    real_init, real_epoch = train_module._Trainer.initialise, StoreRows.epoch

    def gpu_cadence(self, sample):
        real_init(self, sample)
        self.sync_every = 10 ** 9  # only step 0 of each epoch reads back, as on a GPU with few steps

    def poisoned(self, epoch, position=None):
        batches = list(real_epoch(self, epoch, position))
        for i, (batch, after) in enumerate(batches):
            if i == len(batches) - 1:
                batch = batch.clone()
                batch[0, 0] = np.nan
            yield batch, after

    monkeypatch.setattr(train_module._Trainer, "initialise", gpu_cadence)
    monkeypatch.setattr(StoreRows, "epoch", poisoned)
    with pytest.raises(TrainingDiverged, match="non-finite"):
        train_sae(make_synthetic_run(tmp_path), _cfg(epochs=1), progress=False)


@pytest.mark.parametrize("buffer_tokens", [8192, 700], ids=["resident", "streamed"])
def test_stored_copies_of_heldout_documents_are_never_trained_on(tmp_path, buffer_tokens):
    """The on-the-fly rule on the store path: a training document whose text is also a held-out one
    (here documents 3, 50 and 51, planted as copies of held-out 100 and 110) is left out, and counted."""
    from saekit.activations.sources import heldout_copies

    hashes = list(range(1000, 1120))  # 120 documents of 50 rows; the last 24 are held out at 0.2
    hashes[3], hashes[50], hashes[51] = hashes[100], hashes[110], hashes[110]
    run = make_synthetic_run(tmp_path, document_hashes=hashes)
    assert heldout_copies(run, 0.2) == (3, [(150, 200), (2500, 2600)])
    copied = {tuple(r) for r in np.concatenate([run.rows(150, 200), run.rows(2500, 2600)]).tolist()}
    source = StoreRows(run, 0, 4800, 128, buffer_tokens, torch.device("cpu"), 0, *heldout_copies(run, 0.2)[::-1])
    seen = np.concatenate([b.numpy() for b, _ in source.epoch(0)]).tolist()
    assert len(seen) == 4650 - 4650 % 128 and not copied & {tuple(r) for r in seen}
    assert not copied & {tuple(r) for r in source.sample().tolist()}
    _, record = train_sae(run, _cfg(epochs=1), progress=False)
    assert record["training_copies_of_heldout"] == 3 and record["history"][0]["train_tokens"] == 4650 - 4650 % 128


def test_resume_refuses_another_select_dtype_resolution_and_notes_another_device(tmp_path, monkeypatch, capsys):
    """SELECT_DTYPE = "auto" resolves by the hardware: a checkpoint records what it resolved to and
    on which device kind its steps ran. Another resolution is refused; another device is noted."""
    import saekit.training.train as train_module
    from saekit.base.errors import PipelineError

    run = make_synthetic_run(tmp_path)
    cfg = _cfg(epochs=3, select_dtype="auto")
    resolved = {"dtype": torch.bfloat16}
    monkeypatch.setattr(train_module, "select_dtype", lambda setting, device: resolved["dtype"])

    def stop_in_second(record):  # the checkpoint after the first epoch is kept
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(run, cfg, checkpoint_path=tmp_path / "e.pt", progress=False, on_epoch=stop_in_second)
    resolved["dtype"] = torch.float32  # a CPU without native bfloat16
    with pytest.raises(PipelineError, match="pass --SELECT_DTYPE=bfloat16 to resume it"):
        train_sae(run, cfg, checkpoint_path=tmp_path / "e.pt", resume=True, progress=False)
    resolved["dtype"] = torch.bfloat16
    monkeypatch.setattr(train_module, "device_kind", lambda device: "cuda (a GPU)")
    train_sae(run, cfg, checkpoint_path=tmp_path / "e.pt", resume=True, progress=False)
    assert "resuming on cuda (a GPU) a checkpoint made on cpu" in capsys.readouterr().out


@pytest.mark.parametrize("n_dead", [3, 40])
def test_auxk_is_normalised_by_the_residuals_own_variance_and_scaled_by_the_dead_share(n_dead):
    """As Gao et al. cite it (openai's sparse_autoencoder, sparsify, SAELens): the dead latents' error
    over the residual's variance, times min(n_dead / k_aux, 1); 3 dead latents get 3/6 of the weight."""
    from saekit.base.distributed import World
    from saekit.training.train import _Trainer

    trainer = _Trainer(_cfg(auxk_k=6), 12, 1000, torch.device("cpu"), World())
    trainer.sae.init_weights(torch.zeros(12), torch.Generator().manual_seed(0))
    trainer.dead_idx = torch.arange(n_dead)
    x, residual = torch.randn(32, 12), torch.randn(32, 12) * 0.3 + 1.0
    residual_variance = (residual - residual.mean(0)).pow(2).sum()
    expected = min(n_dead / 6, 1.0) * auxk_loss(trainer.sae, x, residual, trainer.dead_idx, 6, residual_variance)
    torch.testing.assert_close(trainer.auxk_term(x, residual, 32), expected)


def test_matryoshka_groups_too_small_for_the_width_are_refused_before_training(tmp_path):
    from saekit.base.errors import PipelineError

    with pytest.raises(PipelineError, match="leaves a group of the 64 latents empty"):
        train_sae(make_synthetic_run(tmp_path), _cfg(architecture="matryoshka", matryoshka_group_fractions=(0.01, 0.5)),
                  checkpoint_path=tmp_path / "c.pt", progress=False)
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka"])
def test_dense_kernels_take_the_sparse_kernels_steps_to_float32_rounding(tmp_path, architecture):
    """KERNELS only changes how a step multiplies: ten steps with dense kernels give the sparse kernels'
    losses and weights within float32 rounding (the tolerance docs/scale.md states)."""
    from saekit.training.train import _Trainer

    run = make_synthetic_run(tmp_path)
    rows = torch.from_numpy(np.concatenate(list(run.iter_rows(0, 1280, 128))))
    trainers = {}
    for kernels in ("sparse", "dense"):
        trainer = _Trainer(_cfg(architecture=architecture, kernels=kernels), run.d_model, 4000, torch.device("cpu"), World())
        assert trainer.sae.kernels == kernels
        trainer.initialise(rows[:1024])
        trainers[kernels] = trainer, [float(trainer.step(rows[i:i + 128], i // 128)[0]) for i in range(0, 1280, 128)]
    (sparse, sparse_losses), (dense, dense_losses) = trainers["sparse"], trainers["dense"]
    assert dense_losses == pytest.approx(sparse_losses, rel=1e-4)
    for name, p in sparse.sae.named_parameters():
        torch.testing.assert_close(dict(dense.sae.named_parameters())[name], p, rtol=1e-4, atol=1e-5, msg=name)


def test_kernels_auto_is_dense_on_a_gpu_and_tf32_is_set_only_there_and_restored():
    from saekit.training.kernels import resolve_kernels, tf32

    assert resolve_kernels("auto", torch.device("cpu")) == "sparse"
    assert resolve_kernels("auto", torch.device("cuda")) == "dense"
    assert resolve_kernels("sparse", torch.device("cuda")) == "sparse"
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before = flags()
    with tf32(True, torch.device("cpu")):
        assert flags() == before
    with tf32(not before[0], torch.device("cuda")):  # flags only: no GPU is needed to set them
        assert flags() == (not before[0], not before[0])
    assert flags() == before


def test_shards_are_verified_as_the_first_epoch_reads_them_with_the_same_refusal(tmp_path):
    """No pass over every shard before training: a shard's checksum is checked when its rows are
    first read, and a corrupt one stops training with the one line a separate pass gave."""
    from saekit.base.integrity import IntegrityError

    run = make_synthetic_run(tmp_path, n_tokens=6000)  # six shards of 1,000 rows
    checked = []
    real_check = run.check_shard

    def recording_check(i):
        checked.append(i)
        real_check(i)

    run.check_shard = recording_check
    run.check_all = lambda progress=False: pytest.fail("a separate pass over every shard ran")
    cfg = _cfg(epochs=1, shuffle_buffer_tokens=1024)
    train_sae(run, cfg, progress=False)
    assert set(checked) == set(range(6))

    shard = run.path / f"{run.meta['shards'][3]['name']}.acts.npy"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    fresh = type(run)(run.path, run.meta)  # a new process: nothing verified yet
    epochs = []
    with pytest.raises(IntegrityError, match=f"{shard.name} is corrupt.*Run stage 01 again"):
        train_sae(fresh, cfg, progress=False, on_epoch=epochs.append)
    assert epochs == []


def test_resume_with_other_kernels_goes_on_and_says_it_is_not_bitwise(tmp_path, capsys):
    """KERNELS changes only the rounding: a checkpoint made with sparse kernels resumes with dense ones
    (the fingerprint leaves KERNELS out), with a note that the result is not bitwise an uninterrupted run's."""
    run = make_synthetic_run(tmp_path)

    def stop_in_second(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(run, _cfg(epochs=3, kernels="sparse"), checkpoint_path=tmp_path / "k.pt", progress=False,
                  on_epoch=stop_in_second)
    _, record = train_sae(run, _cfg(epochs=3, kernels="dense"), checkpoint_path=tmp_path / "k.pt", resume=True,
                          progress=False)
    assert len(record["history"]) == 3
    assert "resuming with KERNELS 'dense' a checkpoint made with 'sparse'" in capsys.readouterr().out
