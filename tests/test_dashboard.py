"""Stage 05 on a concept store written here (stage 04's file formats): the package's tables and HTML,
the standalone dashboard in headless Chromium, and the notebook on smoke artifacts."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, STORIES, TINY_LAYER
from saekit import dashboard
from saekit.notebooks import run_notebook
from saekit.settings import load_settings

NASTY = '</script><img src=x onerror="alert(1)"> & "quotes"'  # a token text must never become markup
MODEL_ID = "fixture-model"


def _example(words: list[str], peak: int, score: float, doc: int, zero: bool = False) -> dict:
    tokens = [w if j == 0 else " " + w for j, w in enumerate(words)]  # as decoded one by one: with their spaces
    lo, hi = max(0, peak - 4), min(len(words), peak + 5)
    acts = [0.0 if zero else round(score * 0.5 ** abs(j - peak), 4) for j in range(lo, hi)]
    return {"text": "".join(tokens), "score": 0.0 if zero else score, "token_str": tokens[peak], "token_idx": peak + 1,
            "doc_index": doc, "context": {"tokens": tokens[lo:hi], "activations": acts, "peak": peak - lo}}


def write_concept_store(store: Path, n_latents: int = 16, live: tuple[int, ...] = (1, 4, 7, 9, 12),
                        model_id: str = MODEL_ID, layer: str = TINY_LAYER) -> dict[int, dict]:
    """concepts.json and top_texts.json as stage 04 writes them, for a few live latents.

    Latent 7 fires on "dog" and is named "dogs and pets"; latent 12's texts and label are hostile HTML."""
    docs = [s.replace(".", " .").split() for s in STORIES]
    latents, top_texts = {}, {str(i): [] for i in range(n_latents)}
    for rank, index in enumerate(live):
        if index == 12:
            top = [_example(docs[0][:3] + [NASTY] + docs[0][3:], 3, 2.5, 0)]
        else:
            word = "dog" if index == 7 else docs[rank][2]
            hits = [(d, words.index(word)) for d, words in enumerate(docs) if word in words][:3]
            top = [_example(docs[d], p, round(3.0 - 0.4 * j, 3), d) for j, (d, p) in enumerate(hits)]
        top_texts[str(index)] = top
        latents[str(index)] = {
            "index": index, "frequency": round(0.3 / (rank + 1), 4), "max_activation": top[0]["score"],
            "mean_activation": top[0]["score"] / 2,
            "label": NASTY if index == 12 else f'"{top[0]["token_str"]}"', "label_source": "peak token",
            "label_score": round(0.9 - 0.1 * rank, 2), "name": "dogs and pets" if index == 7 else None,
            "name_score": 0.8 if index == 7 else None,
            "logit_lens": {"promoted": [[f"up{index}_{j}", 1.5 - 0.1 * j] for j in range(10)],
                           "suppressed": [[NASTY if index == 12 else f"down{index}_{j}", -1.0 + 0.05 * j]
                                          for j in range(10)]},
            "histogram": {"bin_edges": [0.001 * 10 ** (j / 10) for j in range(61)],
                          "counts": [0] * 25 + [1, 4, 9, 5, 2] + [0] * 30},
            "quantile_examples": [{**top[-1], "quantile": q} for q in (4, 1)],
            "non_activating": [_example(docs[(rank + 3) % len(docs)], 2, 0.0, (rank + 3) % len(docs), zero=True)],
        }
    meta = {"model_id": model_id, "layer_signature": layer, "n_latents": n_latents, "k": 4, "dataset": "fixture",
            "split": "heldout", "n_texts": len(docs), "n_tokens": sum(len(d) for d in docs),
            "created": "2025-01-01T00:00:00+00:00", "settings": {}}
    (store / "concepts.json").write_text(json.dumps({"meta": meta, "latents": latents}))
    (store / "top_texts.json").write_text(json.dumps(top_texts))
    return {int(i): latent for i, latent in latents.items()}


@pytest.fixture
def concepts(tmp_path):
    write_concept_store(tmp_path)
    settings = load_settings([f"--STORE_DIR={tmp_path}", f"--MODEL_ID={MODEL_ID}", f"--LAYER_SIGNATURE={TINY_LAYER}"])
    return dashboard.load_concepts(settings)


def test_tables_search_and_summary(concepts):
    rows = dashboard.latent_rows(concepts)
    assert [r["index"] for r in rows] == [1, 4, 7, 9, 12]  # most frequent first
    assert dashboard.search(concepts, 7) == dashboard.search(concepts, "PETS") == dashboard.search(concepts, "7") == [7]
    assert dashboard.search(concepts, 3) == [] and dashboard.search(concepts, "no such thing") == []
    assert set(dashboard.search(concepts, '"')) == {1, 4, 7, 9, 12}
    peaks = dashboard.peak_tokens(concepts)
    assert {"token": " dog", "examples": 1, "latents": 1, "mean_score": 3.0} in peaks
    assert [p["examples"] for p in peaks] == sorted((p["examples"] for p in peaks), reverse=True)
    stats = dashboard.summary(concepts)
    assert (stats["live latents"], stats["dead latents"], stats["named latents"]) == (5, 11, 1)
    assert concepts.frequencies()[7] == concepts.latents[7]["frequency"] and concepts.frequencies()[0] == 0


def test_stage_04_files_must_exist_and_match_the_settings(tmp_path):
    settings = load_settings([f"--STORE_DIR={tmp_path}", f"--MODEL_ID={MODEL_ID}", f"--LAYER_SIGNATURE={TINY_LAYER}"])
    with pytest.raises(dashboard.PipelineError, match="Run stage 04"):
        dashboard.load_concepts(settings)
    write_concept_store(tmp_path, model_id="another-model")
    with pytest.raises(dashboard.PipelineError, match="another-model"):
        dashboard.load_concepts(settings)


def test_latent_html_escapes_text_and_marks_the_peak(concepts):
    page = dashboard.latent_html(concepts, 12)
    assert "<img" not in page and "&lt;/script&gt;&lt;img" in page
    page = dashboard.latent_html(concepts, 7)
    assert re.search(r'class="sae-tok sae-peak" style="background: rgba\([^)]*, 1.00\)"[^>]*> dog</span>', page)
    assert "<svg" in page and "up7_0" in page and "down7_9" in page and "dogs and pets" in page


def test_dashboard_is_self_contained_and_escaped(concepts, tmp_path):
    page = dashboard.write_dashboard(concepts, tmp_path / "dashboard.html").read_text()
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)  # nothing fetched from anywhere
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in data  # so no text inside can close the script element
    latents = json.loads(data)["latents"]
    assert [l["index"] for l in latents] == [1, 4, 7, 9, 12]
    assert next(l for l in latents if l["index"] == 12)["groups"][0]["examples"][0]["tokens"][3] == " " + NASTY


def test_dashboard_reads_what_stage_04_writes(tiny_model, tiny_tokenizer, tmp_path):
    import torch

    from saekit import concepts as stage04
    from saekit.models import resolve_layer
    from saekit.sae import TopKSAE

    sae = TopKSAE(32, 64, 4)
    sae.init_weights(torch.zeros(32), torch.Generator().manual_seed(0))
    col = stage04.collect(tiny_model, tiny_tokenizer, resolve_layer(tiny_model, TINY_LAYER), sae.eval(), STORIES,
                          top_n=3, context_tokens=2, sample_size=8, background_texts=4, max_length=20, batch_size=4,
                          progress=False)
    meta = {"model_id": MODEL_ID, "layer_signature": TINY_LAYER, "dataset": "stories", "split": "heldout"}
    top_texts, exported = stage04.build_exports(col, tiny_model, tiny_tokenizer, sae, context_tokens=2, per_quantile=1,
                                                non_activating=2, meta=meta)
    stage04.write_exports(tmp_path, top_texts, exported)
    concepts = dashboard.load_concepts(load_settings([f"--STORE_DIR={tmp_path}", f"--MODEL_ID={MODEL_ID}",
                                                      f"--LAYER_SIGNATURE={TINY_LAYER}"]))
    live = sorted(concepts.latents)
    assert live == sorted(int(i) for i in exported["latents"]) and len(live) > 5
    assert all("sae-peak" in dashboard.latent_html(concepts, i) for i in live)
    assert dashboard.summary(concepts)["live latents"] == len(live) and dashboard.peak_tokens(concepts)
    data = dashboard.dashboard_data(concepts)
    assert sorted(l["index"] for l in data["latents"]) == live
    for latent in data["latents"]:
        top = latent["groups"][0]["examples"]
        assert top and all(e["tokens"][e["peak"]] for e in top) and "<svg" in latent["summary_html"]


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
    assert _rows(dom) == [7] and "1 of 5 live latents" in dom
    view = dom[dom.index('<section id="view"'):]
    assert 'data-latent="7"' in view[:200] and "latent 7: dogs and pets" in view
    assert re.search(r'<span class="sae-tok sae-peak"[^>]*> dog</span>', view)  # the peak, outlined
    assert re.search(r'<span class="sae-tok" title="1.5" style="background: rgba\(255, 127, 14, 0\.5\);"> big', view)
    assert "<svg" in view and "up7_0" in view and "down7_9" in view
    assert "quantile 4" in view and "not activating" in view

    dom = _chromium_dom(page, "latent-12", tmp_path)
    assert _rows(dom) == [1, 4, 7, 9, 12]  # every live latent, most frequent first
    view = dom[dom.index('<section id="view"'):]
    assert "<img" not in dom and "&lt;/script&gt;&lt;img" in view  # hostile text shown as text

    assert "is dead" in _chromium_dom(page, "latent-3", tmp_path)


def test_notebook_runs_on_smoke_artifacts(smoke_args, tmp_path):
    smoke_store = load_settings(smoke_args).store
    store = tmp_path / "store"
    shutil.copytree(smoke_store, store, ignore=shutil.ignore_patterns("notebooks"))
    settings = load_settings(smoke_args + [f"--STORE_DIR={store}"])
    n_latents = settings.N_LATENTS_MULTIPLIER * 32  # the tiny model's hidden size
    write_concept_store(store, n_latents=n_latents, live=(1, 4, 7, 9, 12), model_id=settings.MODEL_ID)

    executed = run_notebook(ROOT / "05_show_concepts.ipynb", smoke_args + [f"--STORE_DIR={store}"])
    page = (store / "dashboard.html").read_text()
    assert all(f'"index":{i},' in page for i in (1, 4, 7, 9, 12))
    for figure in ("most_active_latents", "peak_tokens"):
        assert (store / "figures" / f"{figure}.png").stat().st_size > 1000
    outputs = json.dumps(json.loads(executed.read_text())["cells"])
    assert "dogs and pets" in outputs and "clean model" in outputs and "SAE spliced" in outputs
