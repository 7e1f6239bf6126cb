"""Sparse probing (saekit.evaluation.probing): the probe finds a latent that is the label and nothing in a shuffled
one; tasks come from the label fields, rare values and missing fields handled; a dataset without
labels is skipped in one line; the stories come from where the SAE trained and from texts it never saw."""
from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch

from conftest import STORIES, TINY_LAYER, run_python, run_stage
from saekit.activations.data import document_hash, load_role_texts, open_texts
from saekit.activations.models import load_model, resolve_layer
from saekit.activations.store import open_run
from saekit.base.settings import SettingsError, load_settings
from saekit.evaluation import probing
from saekit.evaluation.splice import splice_metrics
from saekit.show import plots
from saekit.training.sae import TopKSAE


def _planted(n: int, n_latents: int = 64, latent: int = 7, positives: float = 0.15, seed: int = 0):
    """Sparse non-negative 'pooled codes' in which `latent` is exactly the label, plus noise latents
    that fire as often in both classes (some with a far larger spread than the planted one)."""
    g = np.random.default_rng(seed)
    y = (g.random(n) < positives).astype(np.int8)
    x = g.exponential(1.0, (n, n_latents)) * (g.random((n, n_latents)) < 0.3) * g.uniform(0.5, 20, n_latents)
    x[:, latent] = y
    return torch.from_numpy(x).float(), y


def test_a_latent_that_is_the_label_is_chosen_and_probed_to_accuracy_one():
    x, y = _planted(600)
    x_train, y_train, x_test, y_test = x[:400], y[:400], x[400:], y[400:]
    scores = probing.separation_scores(x_train, y_train)
    assert probing.top_latents(scores, 1).tolist() == [7]
    accuracy, chosen = probing.sparse_probe(x_train, y_train, x_test, y_test)
    assert chosen["1"] == [7] and accuracy["1"] > 0.99
    assert all(accuracy[str(k)] > 0.95 for k in probing.KS)  # more latents do not spoil it


def test_a_shuffled_label_is_probed_at_chance():
    x, y = _planted(600)
    shuffled = np.random.default_rng(1).permutation(y)
    accuracy, _ = probing.sparse_probe(x[:400], shuffled[:400], x[400:], shuffled[400:])
    n_pos = int(shuffled[400:].sum())
    for k, value in accuracy.items():  # within the chance bound that drops a task, and near 0.5
        assert value < probing.chance_bound(n_pos, 200 - n_pos) and abs(value - 0.5) < 0.12, (k, value)


@pytest.mark.parametrize("n, d, lam", [(500, 6, 0.01), (200, 577, 1e-3)])
def test_the_probe_weights_the_classes_and_minimises_its_loss(n, d, lam):
    """The fit is a minimum (gradient ~0, in float64, though its Hessian is float32) of the class-weighted,
    L2-penalised loss; a rare class is not ignored: always answering "no" would score 0.5. The second
    case is the dense probe's shape on few stories: wider than tall, so the classes are separable and
    only the L2 term bounds the weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = ((x[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)) > 1.6).long()  # ~7% positive
    w = probing.fit_logistic(x, y, lam)
    xb = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    weight = torch.where(y > 0, 0.5 / y.sum(), 0.5 / (n - y.sum()))
    grad = xb.T @ (weight * (torch.sigmoid(xb @ w) - y)) + torch.cat([lam * w[:-1], 1e-9 * w[-1:]])
    assert grad.abs().max() < 1e-6
    assert probing.balanced_accuracy(y.numpy(), probing._predict(x, w)) > 0.8


def test_a_fold_without_a_positive_does_not_choose_the_strength(monkeypatch):
    """At PROBE_MIN_POSITIVES = 3 (the least allowed) the dense probe's nested cross-validation sees 2
    positives, so one inner fold has none: its balanced accuracy is undefined (NaN), and the L2 strength
    is chosen on the folds that have both classes, as if that fold were not there."""
    assert np.isnan(probing.balanced_accuracy(np.array([0, 0, 0]), np.array([0, 1, 0])))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    y = np.zeros(60, np.int64)
    y[[3, 17]] = 1
    x[y == 1, 0] += 3.0
    fold = probing._folds(y, probing.CV_FOLDS, 0)
    empty = next(f for f in range(probing.CV_FOLDS) if not y[fold == f].any())
    chosen = []
    real_fit = probing.fit_logistic

    def fit(a, labels, lam, **kwargs):
        chosen.append(lam)
        return real_fit(a, labels, lam, **kwargs)

    monkeypatch.setattr(probing, "fit_logistic", fit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" on the way
        accuracy, lam = probing.probe_accuracy(x, y, x, y)
    scores = []  # each strength's balanced accuracy on the folds that have a positive
    for f in range(probing.CV_FOLDS):
        if f != empty:
            inside, outside = probing._standardised(x[fold != f], x[fold == f])
            scores.append([probing.balanced_accuracy(y[fold == f], probing._predict(
                outside, real_fit(inside, torch.from_numpy(y[fold != f]), strength)))
                for strength in sorted(probing.LAMBDAS, reverse=True)])
    scores = np.array(scores)
    assert lam == sorted(probing.LAMBDAS, reverse=True)[int(np.argmax(scores.mean(0)))]
    assert np.isfinite(accuracy) and chosen[-1] == lam


def test_balanced_accuracy_and_the_chance_bound():
    assert probing.balanced_accuracy(np.array([1, 0, 0, 0]), np.array([0, 0, 0, 0])) == 0.5
    assert probing.balanced_accuracy(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])) == 0.75
    # a guess that ignores the story beats the bound about 0.1% of the time (3 standard errors)
    g = np.random.default_rng(0)
    n_pos, n_neg = 10, 290
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(int)
    guesses = g.random((4000, n_pos + n_neg)) < 0.5
    beats = np.mean([probing.balanced_accuracy(y, guess) >= probing.chance_bound(n_pos, n_neg) for guess in guesses])
    assert beats < 0.01
    assert probing.chance_bound(n_pos, n_neg) > probing.chance_bound(100, 200) > 0.5


def test_tasks_come_from_frequent_values_and_rare_ones_or_missing_fields_are_handled():
    def record(i: int) -> dict:
        r = {"text": f"story {i}", "features": ["dialogue"] * (i % 3 == 0) + ["moral"] * (i % 4 == 0),
             "noun": "ball" if i % 5 == 0 else f"rare{i}", "flag": i % 2 == 0, "kind": "x" if i % 3 else "y"}
        if i % 7 == 0:
            del r["noun"]  # unknown: left out of the noun tasks, not a negative
        if i % 11 == 0:
            r["features"] = None
        return r

    train, test = [record(i) for i in range(100)], [record(i) for i in range(100, 160)]
    tasks, dropped = probing.build_tasks(train, test, ["features", "noun", "flag", "kind", "absent"], min_positives=5)
    names = [t.name for t in tasks]
    # a yes/no field is one task, and so is a field of two values (the other is the same task, flipped)
    assert names == ["features = dialogue", "features = moral", "noun = ball", "flag", "kind = x"]
    ball = tasks[2]
    assert ball.train[0] == -1 and ball.train[5] == 1 and ball.train[1] == 0  # 0: no noun field; 1: "rare1"
    assert tasks[0].train[11] == -1 and tasks[0].train[3] == 1 and tasks[0].train[4] == 0
    assert ball.counts()["train_positives"] == sum(1 for i in range(100) if i % 5 == 0 and i % 7)
    assert any(d["task"].startswith("noun: ") and "fewer than 5" in d["reason"] for d in dropped)  # the rare words
    capped, dropped = probing.build_tasks(train, test, ["features"], min_positives=5, per_field=1)
    assert [t.name for t in capped] == ["features = dialogue"]
    assert any("most frequent" in d["reason"] for d in dropped)


def test_pooling_keeps_each_story_apart():
    rows = torch.tensor([[1.0, -2.0], [3.0, 0.0], [-1.0, 5.0]])
    stories = probing.Stories(rows, torch.tensor([4, 5, 4]), torch.tensor([2, 1]), [{}, {}], "test")
    assert torch.equal(probing.pool_rows(stories, "mean"), torch.tensor([[2.0, -1.0], [-1.0, 5.0]]))
    assert torch.equal(probing.pool_rows(stories, "max"), torch.tensor([[3.0, 0.0], [-1.0, 5.0]]))
    vocabulary = np.array([4, 5])
    assert torch.equal(probing.token_presence(stories, vocabulary), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    sae = TopKSAE(2, 3, 1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    codes = probing.pool_codes(sae, stories, "max")  # the top latent of each row, its largest value per story
    assert torch.allclose(codes, torch.tensor([[3.0, 0.0, 0.0], [0.0, 5.0, 0.0]]))


def _labelled_file(path, with_labels: bool = True):
    pairs = [(a, a) for a in STORIES] + [(a, f"{a} {b}") for a in STORIES for b in STORIES if a != b]
    random.Random(0).shuffle(pairs)
    animals = ("cat", "dog", "bird", "frog", "bear")
    with open(path, "w") as f:
        for first, text in pairs:  # labelled by the first story: 5 of the 8 have an animal
            record = {"text": text}
            if with_labels:
                record["features"] = ["animal"] * any(a in first for a in animals)
                record["noun"] = next((a for a in animals if a in first), "none")
            f.write(json.dumps(record) + "\n")
    return path


def test_the_data_loader_keeps_each_record_with_its_text(tmp_path):
    path = _labelled_file(tmp_path / "stories.jsonl")
    stream = open_texts(str(path), limit=5)
    pairs = list(stream.with_records())
    assert [t for t, _ in pairs] == list(stream) and len(pairs) == 5
    assert all(r["text"] == t and "features" in r for t, r in pairs)
    txt = tmp_path / "plain.txt"
    txt.write_text("one story\n\nanother story\n")
    assert list(open_texts(str(txt)).with_records()) == [("one story", "one story"), ("another story", "another story")]


def test_a_dataset_without_label_fields_is_skipped_in_one_line_before_any_model(tmp_path):
    plain = _labelled_file(tmp_path / "plain.jsonl", with_labels=False)
    settings = load_settings([f"--HF_DATASET={plain}"])
    result = probing.sparse_probing(settings, trained=None)  # nothing but the first record is read
    assert result["skipped"].startswith("sparse probing skipped: the texts have none of the label fields")
    assert "\n" not in result["skipped"] and "PROBE_LABEL_FIELD" in result["skipped"]
    assert probing.summary_text(result) == result["skipped"]
    txt = tmp_path / "plain.txt"
    txt.write_text("\n".join(json.loads(line)["text"] for line in plain.read_text().splitlines()))
    assert probing.sparse_probing(load_settings([f"--HF_DATASET={txt}", "--EVAL_SHARE=0.25"]),
                                  None)["skipped"].startswith("sparse probing skipped")
    assert "off" in probing.sparse_probing(load_settings(["--PROBE_LABEL_FIELD=none"]), None)["skipped"]
    with pytest.raises(probing.ProbingError, match="PROBE_LABEL_FIELD='genre' is not a label field.*features"):
        probing.probe_fields(load_settings([f"--HF_DATASET={_labelled_file(tmp_path / 'l.jsonl')}",
                                            "--PROBE_LABEL_FIELD=genre"]))


@pytest.mark.parametrize("setting,says", [
    ("--PROBE_TEXTS=5", "PROBE_TEXTS=5 must be at least 10"),
    ("--PROBE_MIN_POSITIVES=1", "PROBE_MIN_POSITIVES=1 must be at least 3"),
    ("--PROBE_MIN_ACCURACY=0.3", "PROBE_MIN_ACCURACY=0.3 must be in [0.5, 1]"),
    ("--PROBE_LABEL_FIELD='noun,verb'", "PROBE_LABEL_FIELD='noun,verb' must be '' (automatic), 'none' or one field"),
])
def test_invalid_probe_settings_are_refused_in_one_line(setting, says):
    with pytest.raises(SettingsError) as err:
        load_settings([setting])
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_analysis_notebook_refuses_a_bad_probe_setting_in_one_line(tmp_path):
    proc = run_python(["-m", "saekit.notebooks", "03_analyze_training.ipynb", f"--STORE_DIR={tmp_path}", "--PROBE_MIN_ACCURACY=2"])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1] == "error: PROBE_MIN_ACCURACY=2.0 must be in [0.5, 1]" and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def labelled_runs(tmp_path_factory, tiny_model_dir):
    """Stage 01 on a labelled file, saved both ways: every token (store) and held-out only (model)."""
    folder = tmp_path_factory.mktemp("probing")
    data = _labelled_file(folder / "stories.jsonl")
    base = [f"--MODEL_ID={tiny_model_dir}", f"--LAYER_SIGNATURE={TINY_LAYER}", f"--HF_DATASET={data}",
            "--DATA_LIMIT=40", "--EVAL_DATA_LIMIT=8", "--MAX_LENGTH=24", "--HELDOUT_FRACTION=0.25",
            "--EVAL_SHARE=0.2", "--DEVICE=cpu", "--PROBE_MIN_POSITIVES=3", "--PROBE_TEXTS=20"]
    runs = {}
    for source in ("store", "model"):
        args = base + [f"--STORE_DIR={folder / source}", f"--ACTIVATION_SOURCE={source}"]
        run_stage("01_save_activations.py", args)
        runs[source] = load_settings(args)
    return runs


def _prepare(settings):
    model, tokenizer = load_model(settings.MODEL_ID, "cpu")
    run = open_run(settings.store)
    return probing.prepare(settings, run, run.heldout_start(settings.HELDOUT_FRACTION), model, tokenizer,
                           resolve_layer(model, settings.LAYER_SIGNATURE), progress=False), run


def test_stories_come_from_the_sae_training_texts_and_texts_it_never_saw(labelled_runs):
    """Stored (every token) and on the fly (held-out only) give the same probe stories: the training side
    from the run's rows or embedded again, the test side the evaluation texts then the held-out documents."""
    prepared = {source: _prepare(settings) for source, settings in labelled_runs.items()}
    data, run = prepared["store"]
    hashes = run.document_hashes().tolist()
    first_heldout = run.heldout_start(0.25)
    n_heldout_docs = len({int(d) for d in run.tokens()[first_heldout:, 1]})
    train_texts = [r["text"] for r in data.train.records]
    test_texts = [r["text"] for r in data.test.records]
    assert len(train_texts) == 20 and not set(train_texts) & set(test_texts)
    assert [document_hash(t) for t in train_texts] == hashes[:20]  # the first training documents, in order
    assert {document_hash(t) for t in test_texts[8:]} == set(hashes[-n_heldout_docs:])  # then the held-out ones
    assert "8 evaluation texts" in data.test.source and "held-out documents" in data.test.source
    assert int(data.train.lengths.sum()) == len(data.train.rows) == len(data.train.tokens)

    on_the_fly, _ = prepared["model"]
    assert [r["text"] for r in on_the_fly.train.records] == train_texts
    assert [r["text"] for r in on_the_fly.test.records] == test_texts
    assert "embedded" in on_the_fly.train.source
    # the same activations, embedded again, as the run stored (float16 both ways)
    assert torch.allclose(on_the_fly.train.rows.float(), data.train.rows.float(), atol=1e-2)
    assert torch.equal(on_the_fly.train.tokens, data.train.tokens)

    sae = TopKSAE(run.d_model, 2 * run.d_model, 4)
    sae.init_weights(torch.zeros(run.d_model), torch.Generator().manual_seed(0))
    result = {**data.summary(), **probing.score_sae(sae, data)}
    json.dumps(result)  # goes into analysis.json as it is
    built = [t["task"] for t in result["tasks"]] + [d["task"] for d in result["dropped"]]
    assert "features = animal" in built and any(task.startswith("noun") for task in built), built
    for task in result["tasks"]:
        assert set(task["accuracy"]) == {"1", "2", "5"} and task["best_sae_free"] >= task["needed"]
    for task in result["dropped"]:
        assert task["reason"]
    assert probing.summary_text(result).startswith("sparse probing")
    figure = plots.sparse_probing({"this SAE": result})
    assert figure is not None


def test_the_tasks_and_probes_do_not_depend_on_the_training_seed(labelled_runs):
    """SEED trains the SAE; the probing evaluation's folds are its own, so SAEs of two seeds are
    compared on the same tasks by the same probes."""
    settings = labelled_runs["store"]
    (data, run), (reseeded, _) = _prepare(settings), _prepare(type(settings)(**{**vars(settings), "SEED": 7}))
    assert data.summary() == reseeded.summary()
    sae = TopKSAE(run.d_model, 2 * run.d_model, 4)
    sae.init_weights(torch.zeros(run.d_model), torch.Generator().manual_seed(0))
    assert probing.score_sae(sae, data) == probing.score_sae(sae, reseeded)


def test_the_splices_rows_spare_probing_a_forward_and_change_nothing(labelled_runs):
    """Stage 03's splice keeps the layer output of the evaluation texts that it runs anyway: probing's test
    stories made from those rows are, bit for bit, the ones it would embed itself, and the model runs no
    forward for them."""
    settings = labelled_runs["store"]
    model, tokenizer = load_model(settings.MODEL_ID, "cpu")
    layer = resolve_layer(model, settings.LAYER_SIGNATURE)
    run = open_run(settings.store)
    texts = load_role_texts(settings, "eval").texts
    splice = splice_metrics(model, tokenizer, layer, texts, lambda h: h, torch.zeros(run.d_model), settings.MAX_LENGTH,
                            batch_size=settings.BATCH_SIZE_SAVE, progress=False, layer_rows=len(texts),
                            rows_dtype=getattr(torch, run.meta["dtype"]))
    start = run.heldout_start(settings.HELDOUT_FRACTION)
    embedded = probing.prepare(settings, run, start, model, tokenizer, layer, progress=False)
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    shared = probing.prepare(settings, run, start, model, tokenizer, layer, progress=False,
                             known=dict(zip(texts, splice["layer_rows"])))
    handle.remove()
    assert not calls  # the training side comes from the run's rows, the test side from the splice's
    assert "8 evaluation texts" in shared.test.source
    assert torch.equal(shared.test.rows, embedded.test.rows) and torch.equal(shared.test.tokens, embedded.test.tokens)
    assert shared.summary() == embedded.summary()


def _word_stories(n: int, rule, seed: int) -> probing.Stories:
    """`n` stories of 12 random tokens (of 40), with random activations; `rule(tokens, g)` gives each
    story's set of "features" values."""
    g = np.random.default_rng(seed)
    tokens = g.integers(0, 40, (n, 12))
    records = [{"text": str(i), "features": sorted(rule(set(t.tolist()), g))} for i, t in enumerate(tokens)]
    return probing.Stories(torch.from_numpy(g.normal(size=(n * 12, 8))).float(), torch.from_numpy(tokens.ravel()),
                           torch.full((n,), 12), records, f"{n} made-up stories")


def test_tasks_are_chosen_on_the_training_stories_and_the_test_stories_choose_nothing():
    """"read" is carried by token 7 on both sides. "luck" is token 9 with 35% of its labels flipped on the
    training side (cross-validated near 0.56, under the 0.6 bar), and exactly token 9 on the test side: a
    choice by test scores keeps it (its probe, fit on the training side, finds token 9 and scores high
    there). The test stories must choose nothing: scrambling their labels changes no choice."""
    from types import SimpleNamespace

    settings = SimpleNamespace(PROBE_MIN_POSITIVES=5, PROBE_MIN_ACCURACY=0.6)

    def train_rule(tokens, g):
        return ({"read"} if 7 in tokens else set()) | ({"luck"} if (9 in tokens) != (g.random() < 0.35) else set())

    def test_rule(tokens, g):
        return ({"read"} if 7 in tokens else set()) | ({"luck"} if 9 in tokens else set())

    train = _word_stories(300, train_rule, 0)
    result = probing.references(train, _word_stories(200, test_rule, 1), ["features"], settings)
    kept = {t["task"]: t for t in result["references"]}
    assert set(kept) == {"features = read"} and kept["features = read"]["dense"] is not None
    assert kept["features = read"]["best_sae_free_cv"] >= kept["features = read"]["needed"]
    luck = next(d for d in result["dropped"] if d["task"] == "features = luck")
    assert luck["best_sae_free_cv"] < luck["needed"] and "dense" not in luck  # never scored on the test side
    scrambled = _word_stories(200, lambda tokens, g: {"read", "luck"} if g.random() < 0.4 else set(), 1)
    again = probing.references(train, scrambled, ["features"], settings)
    assert [t["task"] for t in again["references"]] == ["features = read"]
    assert again["references"][0]["best_sae_free_cv"] == kept["features = read"]["best_sae_free_cv"]
