"""Stage 05 on a set of exports written by stage 04's own code from made-up codes: the package's tables
and HTML, the dashboard's files, the page in headless Chromium, and the notebook on smoke artifacts."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_LAYER
from saekit.base.errors import PipelineError
from saekit.base.settings import load_settings
from saekit.concepts.exports import ConceptsMismatchError, apply_names, build_concepts, publish
from saekit.concepts.naming import Name
from saekit.concepts.synthetic import synthetic_codes, synthetic_lens
from saekit.notebooks import run_notebook
from saekit.show import dashboard
from saekit.training.sae import TopKSAE

NASTY = '</script><img src=x onerror="alert(1)"> & "quotes"'  # a token text must never become markup
MODEL_ID = "fixture-model"
PETS = ["dog", "puppy", "cat", "kitten", "pony", "hamster"]
WORDS = ["the", "a", "kite", "ran", NASTY] + PETS + [f"w{i}" for i in range(50)]
W = {w: i for i, w in enumerate(WORDS)}


def save_sae(store: Path, seed: int = 0, d: int = 8, n: int = 16) -> str | None:
    sae = TopKSAE(d, n, 4)
    sae.init_weights(torch.zeros(d), torch.Generator().manual_seed(seed))
    path = store / "sae_model" / "topk_sae.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    sae.save(path, model_id=MODEL_ID, layer_signature=TINY_LAYER, activation_run_id="run-a")
    return TopKSAE.load(path)[1].get("sae_id")


def write_concept_store(store: Path, sae_id: str | None, n_latents: int = 16, model_id: str = MODEL_ID) -> None:
    """A set as stage 04 publishes it. Latent 7 fires on six pet words, more than its label may list, and
    its name "dogs and pets" beat the label; latent 12 fires on a token of hostile HTML; latent 3 is dead."""
    planted = {7: lambda b, w, a: np.isin(w, [W[p] for p in PETS]), 12: lambda b, w, a: w == W[NASTY],
               9: lambda b, w, a: b == W["the"]}
    codes = synthetic_codes(WORDS, 40, 32, n_latents, 3, planted)
    dead = codes.latents == 3
    codes.latents[dead], codes.values[dead] = -1, 0
    live = sorted(set(codes.firing[1].tolist()))
    meta = {"model_id": model_id, "layer_signature": TINY_LAYER, "sae_id": sae_id, "k": 3, "dataset": "fixture",
            "split": "heldout", "naming": "named by a fixture"}
    built = build_concepts(codes, synthetic_lens(WORDS, live), meta, top_n=4, context=3, per_quantile=1,
                           non_activating=2, scoring_examples=8, max_keys=2, min_f1=0.3, min_support=1)
    apply_names(built, {7: Name("dogs and pets", 1.0, 1.0), 9: Name("a name at chance", 0.5, 0.5)}, 0.7)
    publish(store, built)


def _settings(store: Path, *extra: str):
    return load_settings([f"--STORE_DIR={store}", f"--MODEL_ID={MODEL_ID}", f"--LAYER_SIGNATURE={TINY_LAYER}", *extra])


@pytest.fixture
def concepts(tmp_path):
    write_concept_store(tmp_path, save_sae(tmp_path))
    return dashboard.load_concepts(_settings(tmp_path))


def test_tables_search_and_summary(concepts):
    rows = dashboard.latent_rows(concepts)
    bounds = [r["f1_low"] for r in rows if r["f1_low"] is not None]  # scorable first, by the F1's lower bound
    assert bounds == sorted(bounds, reverse=True) and all(r["f1_low"] is None for r in rows[len(bounds):])
    assert {r["index"] for r in rows} == set(range(16)) - {3}
    by_index = {r["index"]: r for r in rows}
    assert by_index[7]["name"] == "dogs and pets" and concepts.title(7) == "dogs and pets"
    assert by_index[9]["name"] is None and concepts.title(9) == "after: the"  # its name did not earn the title
    assert dashboard.search(concepts, 7) == dashboard.search(concepts, "PETS") == [7]
    assert dashboard.search(concepts, 3) == [] and dashboard.search(concepts, "no such thing") == []
    assert dashboard.search(concepts, "after: the") == [9]
    peaks = dashboard.peak_tokens(concepts)
    assert [p["examples"] for p in peaks] == sorted((p["examples"] for p in peaks), reverse=True)
    stats = dashboard.summary(concepts)
    assert (stats["live latents"], stats["dead latents"], stats["named latents"]) == (15, 1, 2)
    assert stats["names that became the title"] == 1 and stats["explained latents"] >= 3
    assert concepts.frequencies()[7] == concepts.latents[7]["frequency"] and concepts.frequencies()[3] == 0


def test_readers_refuse_a_missing_set_or_one_from_another_sae(tmp_path):
    sae_id = save_sae(tmp_path)
    with pytest.raises(PipelineError, match="Run stage 04"):
        dashboard.load_concepts(_settings(tmp_path))
    write_concept_store(tmp_path, sae_id, model_id="another-model")
    with pytest.raises(ConceptsMismatchError, match="another-model"):
        dashboard.load_concepts(_settings(tmp_path))
    write_concept_store(tmp_path, sae_id)
    dashboard.load_concepts(_settings(tmp_path))
    if save_sae(tmp_path, seed=1) is not None:  # the SAE is retrained: its concepts are stale
        with pytest.raises(ConceptsMismatchError, match="Run stage 04 again"):
            dashboard.load_concepts(_settings(tmp_path))


def test_latent_html_escapes_text_and_marks_the_peak(concepts):
    page = dashboard.latent_html(concepts, 12)
    assert "<img" not in page and "&lt;/script&gt;&lt;img" in page
    page = dashboard.latent_html(concepts, 7)
    assert re.search(r'class="sae-tok sae-peak" style="background: rgba\([^)]*\)"[^>]*> (dog|puppy|cat|kitten|pony|'
                     r'hamster)</span>', page)
    assert "<svg" in page and "dogs and pets" in page and "held-out F1" in page and "it is the title" in page


def test_dashboard_files_are_small_self_contained_and_escaped(concepts, tmp_path):
    page_path = dashboard.write_dashboard(concepts, tmp_path / "out" / "dashboard.html")
    page = page_path.read_text()
    files = sorted((tmp_path / "out" / "dashboard_files").iterdir())
    assert len(files) == 1  # one folder, named in the page
    every_file = [page] + [f.read_text() for f in files[0].iterdir()]
    assert not any(re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text) for text in every_file)  # no network
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    assert "<" not in re.search(r'id="data">(.*?)</script>', page, re.S).group(1)  # no text can close the script
    assert [r[0] for r in data["rows"]] == [r["index"] for r in dashboard.latent_rows(concepts)]
    assert data["files"] == f"dashboard_files/{files[0].name}"
    texts = (files[0] / "texts.js").read_text()
    assert texts.count('"tokens":') == 1 and NASTY not in texts  # each text once, escaped
    for name in ("page.html", "app.js", "latent.css", "page.css"):  # the assets, as files of their own
        assert (dashboard.ASSETS / name).exists()
    size = dashboard.dashboard_size(page_path)
    assert size["page_bytes"] < size["total_bytes"] < 200_000
    dashboard.write_dashboard(concepts, page_path)  # a rewrite replaces the folder
    assert len(list((tmp_path / "out" / "dashboard_files").iterdir())) == 1


def _chromium_dom(page: Path, fragment: str, tmp_path: Path) -> str:
    profile = tmp_path / f"chromium-profile-{abs(hash(fragment))}"
    proc = subprocess.run(
        [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--dump-dom", f"{page.as_uri()}#{fragment}"],
        capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0 and "</html>" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def _rows(dom: str) -> list[int]:
    return [int(i) for i in re.findall(r'<tr data-latent="(\d+)"', dom)]


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Chromium is not installed: apt-get install -y chromium (.ci/run installs it)")
def test_dashboard_renders_in_headless_chromium(concepts, tmp_path):
    page = dashboard.write_dashboard(concepts, tmp_path / "dashboard.html")

    dom = _chromium_dom(page, "search=pets", tmp_path)
    assert _rows(dom) == [7] and "1 of 15 live latents" in dom and re.search(r'data-ready-ms="[\d.]+"', dom)
    view = dom[dom.index('<section id="view"'):]  # its details came from the folder beside the page
    assert 'data-latent="7"' in view[:200] and "latent 7: dogs and pets" in view and "it is the title" in view
    assert re.search(r'<span class="sae-tok sae-peak"[^>]*> (dog|puppy|cat|kitten|pony|hamster)</span>', view)
    assert "<svg" in view and dashboard.INTERVALS_TITLE in view and "interval 4: (" in view and "not activating" in view
    assert dashboard.OUTPUT_SIDE_TITLES["measured"] + ": promotes" in view

    dom = _chromium_dom(page, "latent-12", tmp_path)
    assert _rows(dom) == [r["index"] for r in dashboard.latent_rows(concepts)]  # sorted by score, best first
    assert 'th data-key="f1_low" aria-sort="descending"' in dom
    view = dom[dom.index('<section id="view"'):]
    assert "<img" not in dom and "&lt;/script&gt;&lt;img" in view  # hostile text shown as text

    dom = _chromium_dom(page, "bench", tmp_path)  # the page clicks the score's header: lowest scores first
    rows = dashboard.latent_rows(concepts)
    by_bound = sorted(rows, key=lambda r: (r["f1_low"] is None, r["f1_low"] or 0, r["index"]))  # missing last
    assert _rows(dom) == [r["index"] for r in by_bound]
    assert 'th data-key="f1_low" aria-sort="ascending"' in dom and re.search(r'data-sort-ms="[\d.]+"', dom)

    assert "is dead" in _chromium_dom(page, "latent-3", tmp_path)
    shutil.rmtree(tmp_path / "dashboard_files")
    assert "keep the folder" in _chromium_dom(page, "latent-7", tmp_path)  # says what is missing


def test_notebook_runs_on_smoke_artifacts(smoke_args, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(load_settings(smoke_args).store, store, ignore=shutil.ignore_patterns("notebooks", "concept*"))
    settings = load_settings(smoke_args + [f"--STORE_DIR={store}"])
    sae, meta = TopKSAE.load(store / "sae_model" / "topk_sae.pt")
    write_concept_store(store, meta.get("sae_id"), n_latents=sae.n_latents, model_id=settings.MODEL_ID)

    executed = run_notebook(ROOT / "05_show_concepts.ipynb", smoke_args + [f"--STORE_DIR={store}"])
    page = (store / "dashboard.html").read_text()
    assert '"dogs and pets"' in page and (store / "dashboard_files").is_dir()
    for figure in ("most_active_latents", "peak_tokens"):
        assert (store / "figures" / f"{figure}.png").stat().st_size > 1000
    outputs = json.dumps(json.loads(executed.read_text())["cells"])
    assert "dogs and pets" in outputs and "clean model" in outputs and "SAE spliced" in outputs
