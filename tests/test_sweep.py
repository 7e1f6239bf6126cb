"""SWEEP: several SAEs trained on the same batches in one pass (saekit.training.sweep), compared and one chosen by
stage 03 (saekit.evaluation.sweep)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import (assert_one_line_error, checksums, make_synthetic_run, run_notebook_as_user, run_python,
                      run_stage, store_of, with_store)
from saekit.activations.sources import StoreRows
from saekit.base.settings import SettingsError, load_settings
from saekit.training.sweep import Variant, train_sweep
from saekit.training.train import TrainConfig, _Checkpoints, train_sae

SMALL = dict(n_latents_multiplier=4, k=3, epochs=3, batch_size=128, lr=3e-3, warmup_steps=10,
             heldout_fraction=0.2, shuffle_buffer_tokens=2048, checkpoint_seconds=0.0)
WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _cfg(**overrides) -> TrainConfig:
    return replace(TrainConfig.from_settings(load_settings([])), **{**SMALL, **overrides})


VARIANTS = [Variant("k3", _cfg()), Variant("batchtopk-k6-x2", _cfg(k=6, n_latents_multiplier=2, architecture="batchtopk")),
            Variant("matryoshka-k4", _cfg(k=4, architecture="matryoshka", lr=2e-3))]


def _assert_same(a, b) -> None:
    for name in WEIGHTS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_each_sae_of_a_sweep_equals_its_own_run_and_the_rows_are_read_once(tmp_path, monkeypatch):
    """The strongest proof that the rows are shared right: every SAE of the sweep has, bit for bit, the weights
    and history of its own run with the same seed; and the sweep reads each epoch's rows once, not once per SAE."""
    run = make_synthetic_run(tmp_path)
    passes, real_epoch = [], StoreRows.epoch

    def counted(self, epoch, position=None):
        passes.append(epoch)
        return real_epoch(self, epoch, position)

    monkeypatch.setattr(StoreRows, "epoch", counted)
    swept = train_sweep(run, VARIANTS, progress=False)
    assert passes == [0, 1, 2]  # one pass over the rows an epoch, for all three SAEs
    for variant in VARIANTS:
        alone, record = train_sae(run, variant.cfg, progress=False)
        sae, swept_record = swept[variant.name]
        assert sae.architecture == variant.cfg.architecture and sae.k == variant.cfg.k
        _assert_same(alone, sae)
        assert [h["heldout_fvu"] for h in record["history"]] == [h["heldout_fvu"] for h in swept_record["history"]]
        assert record["latent_frequency"] == swept_record["latent_frequency"]
        assert swept_record["sweep"] == {"name": variant.name, "trained_with": [v.name for v in VARIANTS]}


def test_a_sweep_interrupted_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    run = make_synthetic_run(tmp_path)
    straight = train_sweep(run, VARIANTS, checkpoint_path=tmp_path / "a.pt", progress=False)
    real_save, saves = _Checkpoints.save, []

    def save_then_stop(self, trainer, history, epoch, partial=None):
        real_save(self, trainer, history, epoch, partial)
        saves.append(partial)
        if len(saves) == 4:  # epoch 2's first buffer: mid-epoch, after a whole epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(_Checkpoints, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_sweep(run, VARIANTS, checkpoint_path=tmp_path / "b.pt", progress=False)
    assert saves[-1] is not None and saves[0] is not None  # stopped mid-epoch, as the test means to
    monkeypatch.setattr(_Checkpoints, "save", real_save)
    resumed = train_sweep(run, VARIANTS, checkpoint_path=tmp_path / "b.pt", resume=True, progress=False)
    for name, (sae, record) in straight.items():
        _assert_same(sae, resumed[name][0])
        assert [h["train_loss"] for h in record["history"]] == [h["train_loss"] for h in resumed[name][1]["history"]]


def test_a_sweep_refuses_the_checkpoint_of_another_sweep(tmp_path):
    run = make_synthetic_run(tmp_path)
    short = [replace(v, cfg=replace(v.cfg, epochs=1)) for v in VARIANTS[:2]]
    train_sweep(run, short, checkpoint_path=tmp_path / "c.pt", progress=False)
    other = [short[0], Variant(short[1].name, replace(short[1].cfg, k=5))]
    with pytest.raises(Exception, match="other settings"):
        train_sweep(run, other, checkpoint_path=tmp_path / "c.pt", resume=True, progress=False)


@pytest.mark.parametrize("sweep,says", [
    ("[{'TOPK': 8}, {'TOP_K': 4}]", "SWEEP[0] has unknown key(s) ['TOPK']"),
    ("[{'TOP_K': 4}, {'TOP_K': 4}]", "SWEEP trains 'topk-k4-x4' more than once"),
    ("[{'TOP_K': 4, 'name': 'a'}, {'TOP_K': 2, 'name': 'a'}]", "SWEEP trains 'a' more than once"),
    ("[{'TOP_K': 0}, {'TOP_K': 4}]", "SWEEP[0]'s TOP_K=0 must be at least 1"),
    ("[{'ARCHITECTURE': 'jumprelu'}, {'TOP_K': 4}]", "SWEEP[0]'s ARCHITECTURE='jumprelu' must be one of"),
    ("[{'TOP_K': 4}]", "SWEEP has one variant"),
    ("[{'TOP_K': 4, 'name': 'My SAE'}, {'TOP_K': 2}]", "SWEEP[0]'s name 'My SAE' must be lower-case letters"),
])
def test_bad_sweep_entries_are_refused_in_one_line(sweep, says):
    with pytest.raises(SettingsError) as refused:
        load_settings([f"--SWEEP={sweep}"])
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_sweep_choice_must_name_an_sae_of_the_sweep():
    with pytest.raises(SettingsError, match="SWEEP_CHOICE='k5' must be '' .* or one of SWEEP's names: topk-k4-x4, "):
        load_settings(["--SWEEP=[{'TOP_K': 4}, {'TOP_K': 2}]", "--SWEEP_CHOICE=k5"])


def _rows(*specs):
    """Rows as compare_sweep makes them; `half`: the half-width of the 95% interval of each paired difference."""
    rows = [{"name": n, "verdict": v, "l0": l0, "delta_ce": ce} for n, v, l0, ce, _ in specs]
    for row, (*_, half) in zip(rows, specs):
        row["delta_ce_minus"] = {other["name"]: [row["delta_ce"] - other["delta_ce"] + shift for shift in (0, -half, half)]
                                 for other in rows if other is not row}
    return rows


@pytest.mark.parametrize("rows,chosen", [
    # k32 has the lowest ΔCE; the texts cannot tell k16 from it (paired interval reaches 0), and it is sparser; k8 is
    # resolved as worse
    (_rows(("k8", "PASS", 8, 0.040, 0.004), ("k16", "PASS", 16, 0.031, 0.003), ("k32", "PASS", 32, 0.029, 0.003)), "k16"),
    # the same figures, narrower paired intervals: every other SAE is resolved as worse than the best
    (_rows(("k8", "PASS", 8, 0.040, 0.001), ("k16", "PASS", 16, 0.031, 0.001), ("k32", "PASS", 32, 0.029, 0.001)), "k32"),
    # a failing SAE is never chosen over passing ones, however good its ΔCE
    (_rows(("k8", "FAIL", 8, 0.001, 0.001), ("k16", "PASS", 16, 0.031, 0.001)), "k16"),
    # none passes: all compete by the same rule
    (_rows(("k8", "FAIL", 8, 0.070, 0.01), ("k16", "FAIL", 16, 0.065, 0.01)), "k8"),
])
def test_stage_03s_rule_picks_the_sparsest_sae_the_texts_cannot_tell_from_the_best(rows, chosen):
    from saekit.evaluation.sweep import choose

    name, why = choose(rows)
    assert name == chosen and chosen in why


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory, smoke_args) -> list[str]:
    """The smoke store copied, with a sweep of two SAEs trained from it by stage 02."""
    import shutil

    store = tmp_path_factory.mktemp("sweep") / "store"
    shutil.copytree(store_of(smoke_args), store, ignore=shutil.ignore_patterns("models"))
    args = with_store(smoke_args, store) + ["--SWEEP=[{'TOP_K': 4}, {'TOP_K': 2, 'ARCHITECTURE': 'batchtopk'}]"]
    before = checksums(store / "sae_model")
    proc = run_stage("02_train_sae.py", args)
    assert "sweep of 2 SAEs on the same batches: topk-k4-x2, batchtopk-k2-x2" in proc.stdout
    assert checksums(store / "sae_model") == before  # a sweep leaves stage 02's one-SAE paths alone
    return args


def test_stage_02_saves_each_sae_of_a_sweep_under_its_name(sweep_store, smoke_args):
    from saekit.base.integrity import read_sealed_json
    from saekit.training.sae import TopKSAE

    store = store_of(sweep_store)
    for name, k in (("topk-k4-x2", 4), ("batchtopk-k2-x2", 2)):
        folder = store / "sweep" / name
        sae, meta = TopKSAE.load(folder / "topk_sae.pt")
        history = read_sealed_json(folder / "training_history.json", "")
        assert sae.k == k and meta["sweep_name"] == name and history["sae_id"] == meta["sae_id"]
        assert json.loads((folder / "saelens" / "cfg.json").read_text())["metadata"]["sae_id"] == meta["sae_id"]
    # the TopK 4 of the sweep is the smoke run's own SAE (same settings, seed and batches), bit for bit
    _assert_same(TopKSAE.load(store_of(smoke_args) / "sae_model" / "topk_sae.pt")[0],
                 TopKSAE.load(store / "sweep" / "topk-k4-x2" / "topk_sae.pt")[0])


def test_stages_04_and_05_need_a_choice_before_stage_03_makes_one(sweep_store):
    assert_one_line_error(run_python(["-m", "saekit.concepts.runner", *sweep_store]),
                          "stage 03 has not chosen one yet", "SWEEP_CHOICE")


@pytest.mark.slow
def test_stage_03_compares_the_sweep_and_names_the_sae_stages_04_and_05_read(sweep_store, tmp_path):
    from saekit.base.integrity import read_sealed_json
    from saekit.evaluation.sweep import choose

    store = store_of(sweep_store)
    run_notebook_as_user("03_analyze_training.ipynb", sweep_store)
    choice = read_sealed_json(store / "sweep_choice.json", "")
    assert [r["name"] for r in choice["table"]] == ["topk-k4-x2", "batchtopk-k2-x2"]
    assert choice["chosen"] == choose(choice["table"])[0]
    chosen = next(r for r in choice["table"] if r["name"] == choice["chosen"])
    analysis = json.loads((store / "analysis.json").read_text())
    assert analysis["sae_id"] == chosen["sae_id"]  # the rest of stage 03 analysed the chosen SAE
    assert (store / "figures" / "sweep_frontier.png").is_file()
    for row in choice["table"]:  # each SAE on the same held-out rows: its own FVU as stage 02 measured it
        history = read_sealed_json(store / "sweep" / row["name"] / "training_history.json", "")
        assert row["fvu"] == pytest.approx(history["history"][-1]["heldout_fvu"], abs=1e-5)
    concepts = run_python(["-m", "saekit.concepts.runner", *sweep_store, "--N_LATENTS_TO_NAME=-1"])
    assert concepts.returncode == 0, concepts.stderr[-3000:]
    manifest = json.loads((store / "concepts" / (store / "concepts_id.txt").read_text().strip() / "manifest.json").read_text())
    assert manifest["sae_id"] == chosen["sae_id"]  # stage 04 read the SAE stage 03 chose


def test_without_sweep_stage_02_keeps_the_specifications_paths(smoke_args):
    from saekit.training.sweep import chosen_name, history_path, sae_folder

    settings = load_settings(smoke_args)
    store = store_of(smoke_args)
    assert settings.SWEEP == [] and chosen_name(settings) is None
    assert sae_folder(store) == store / "sae_model" and history_path(store) == store / "training_history.json"
    assert (store / "sae_model" / "topk_sae.pt").is_file() and (store / "training_history.json").is_file()
    assert not (store / "sweep").exists() and not (store / "sweep_checkpoint.pt").exists()


def test_a_sweep_entry_that_cannot_train_under_torchrun_is_named(tmp_path):
    from saekit.base.distributed import World
    from saekit.base.errors import PipelineError

    with pytest.raises(PipelineError, match="SWEEP's 'batchtopk-k6-x2': ARCHITECTURE='batchtopk' trains in one process"):
        train_sweep(make_synthetic_run(tmp_path), VARIANTS[:2], progress=False, world=World(0, 2, 0))


def test_a_sweep_entry_wider_than_its_dictionary_is_refused_before_anything_is_written(store_copy):
    store, args = store_copy
    before = checksums(store)
    assert_one_line_error(run_python(["02_train_sae.py", *args, "--SWEEP=[{'TOP_K': 4}, {'TOP_K': 100}]"]),
                          "SWEEP's 'topk-k100-x2': TOP_K=100 must be at most the number of latents")
    assert checksums(store) == before


@pytest.fixture(scope="module")
def online_store(tmp_path_factory, smoke_args) -> list[str]:
    """The smoke settings on the fly: stage 01 saved only the held-out documents."""
    args = with_store(smoke_args, tmp_path_factory.mktemp("sweep_online") / "store") + [
        "--ACTIVATION_SOURCE=model", "--SHUFFLE_BUFFER_TOKENS=150"]
    run_stage("01_save_activations.py", args)
    return args


def test_on_the_fly_the_model_runs_once_for_the_whole_sweep(online_store, monkeypatch):
    """Each SAE of a sweep on the fly equals its own on-the-fly run, and the sweep runs the model over the
    training texts as often as one run does, not once per SAE."""
    from saekit.activations.models import load_model
    from saekit.activations.sources import ModelRows, model_rows
    from saekit.activations.store import open_run
    from saekit.training.sweep import sweep_variants

    settings = load_settings(online_store + ["--SWEEP=[{'TOP_K': 4}, {'TOP_K': 2, 'N_LATENTS_MULTIPLIER': 1}]"])
    model, tokenizer = load_model(settings.MODEL_ID)
    run = open_run(settings.store)
    forwards, real_rows = [], ModelRows._rows

    def counted(self, *args, **kwargs):
        forwards.append(1)
        return real_rows(self, *args, **kwargs)

    monkeypatch.setattr(ModelRows, "_rows", counted)
    variants = sweep_variants(settings)
    swept = train_sweep(run, variants, progress=False, source=model_rows(settings, run, model, tokenizer, torch.device("cpu")))
    sweep_forwards, forwards[:] = len(forwards), []
    for variant in variants:
        alone, _ = train_sae(run, variant.cfg, progress=False,
                             source=model_rows(settings, run, model, tokenizer, torch.device("cpu")))
        _assert_same(alone, swept[variant.name][0])
    assert sweep_forwards == len(forwards) // len(variants) > 1  # each separate run paid the same forwards again


@pytest.mark.slow
def test_a_sweep_under_two_gloo_processes_equals_one(sweep_store, tmp_path):
    """torchrun: every SAE of the sweep takes the data-parallel step it takes alone (TopK entries only)."""
    import shutil

    from conftest import ROUND_OFF, torchrun
    from saekit.training.sae import TopKSAE

    store = tmp_path / "store"
    shutil.copytree(store_of(sweep_store), store, ignore=shutil.ignore_patterns("models", "sweep", "sweep_*"))
    args = [a for a in with_store(sweep_store, store) if not a.startswith("--SWEEP=")]
    two_topk = "--SWEEP=[{'TOP_K': 4}, {'TOP_K': 2, 'name': 'k2'}]"
    run_stage("02_train_sae.py", [*args, two_topk])
    shutil.move(store / "sweep", tmp_path / "one")
    assert "in 2 processes" in torchrun(["02_train_sae.py"], [*args, two_topk]).stdout
    for name in ("topk-k4-x2", "k2"):
        a, b = (TopKSAE.load(folder / name / "topk_sae.pt")[0] for folder in (tmp_path / "one", store / "sweep"))
        for weight in WEIGHTS:
            torch.testing.assert_close(getattr(a, weight), getattr(b, weight), **ROUND_OFF, msg=weight)


def test_memory_is_checked_for_every_sae_of_the_sweep_together_before_training(tmp_path, monkeypatch):
    from saekit.base import memory

    run = make_synthetic_run(tmp_path)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1)
    with pytest.raises(memory.OutOfMemory) as refused:
        train_sweep(run, VARIANTS, progress=False, on_epoch=lambda epoch: pytest.fail("trained"))
    message = str(refused.value)
    for variant in VARIANTS:
        assert f"{variant.name}: the SAE, its gradients and Adam's state" in message
    assert "the shuffle buffer" in message and "or train fewer SAEs in SWEEP." in message


def test_stages_04_and_05_stop_when_the_chosen_sae_of_the_sweep_failed(tmp_path):
    """SWEEP_CHOICE may name another SAE than the one stage 03 analysed last: its own verdict, from the comparison,
    decides."""
    from saekit.base.integrity import write_sealed_json
    from saekit.evaluation.verdict import VerdictFailedError, require_passed

    sweep = "--SWEEP=[{'TOP_K': 4}, {'TOP_K': 2}]"
    table = [{"name": "topk-k4-x4", "verdict": "PASS", "failed_checks": []},
             {"name": "topk-k2-x4", "verdict": "FAIL", "failed_checks": ["held-out FVU"]}]
    write_sealed_json(tmp_path / "sweep_choice.json", {"chosen": "topk-k4-x4", "table": table})
    (tmp_path / "analysis.json").write_text(json.dumps({"passed": True, "checks": []}))
    require_passed(load_settings([sweep, f"--STORE_DIR={tmp_path}"]))  # stage 03's choice passed
    with pytest.raises(VerdictFailedError, match="SWEEP's 'topk-k2-x4' a FAIL \\(held-out FVU"):
        require_passed(load_settings([sweep, f"--STORE_DIR={tmp_path}", "--SWEEP_CHOICE=topk-k2-x4"]))
    require_passed(load_settings([sweep, f"--STORE_DIR={tmp_path}", "--SWEEP_CHOICE=topk-k2-x4",
                                  "--CONTINUE_AFTER_FAIL=True"]))
