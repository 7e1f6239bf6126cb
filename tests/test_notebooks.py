"""The notebooks run headless on smoke artifacts (tiny model, test stories), as `make demo` runs them."""
import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_offline, copy_store, run_python, store_of
from saekit.activations.data import load_role_texts
from saekit.activations.models import load_model, resolve_layer
from saekit.activations.store import open_run
from saekit.base.settings import load_settings
from saekit.notebooks import run_notebook
from saekit.training.sae import TopKSAE


@pytest.fixture(scope="module")
def stage_03(smoke_args, tmp_path_factory):
    """Notebook 03 run once on a copy of the smoke store: (its arguments, its executed copy, analysis.json)."""
    args = copy_store(smoke_args, tmp_path_factory.mktemp("stage03") / "store", "analysis.json", "notebooks")
    executed = run_notebook(ROOT / "03_analyze_training.ipynb", args)
    return args, executed, json.loads((store_of(args) / "analysis.json").read_text())


def test_analysis_notebook_writes_its_verdict(stage_03):
    args, executed, report = stage_03
    store = store_of(args)
    assert executed.exists() and executed.with_suffix(".html").exists()
    checks = {c["check"]: c for c in report["checks"]}
    assert set(checks) >= {"L0 equals TOP_K", "dead latents (held-out)", "held-out FVU",
                           "CE-loss recovered vs mean-ablation", "delta CE (nats)", "W_enc moved from its initialisation"}
    # N/A: CE recovered is not judged where mean-ablating the layer costs nothing (a random tiny model may)
    assert all(c["result"] in ("PASS", "FAIL", "N/A") for c in report["checks"])
    assert report["passed"] == all(c["result"] != "FAIL" for c in report["checks"])
    assert_offline(executed.with_suffix(".html").read_text())
    assert checks["L0 equals TOP_K"]["result"] == "PASS"  # TopK gives exactly k on any SAE
    assert checks["W_enc moved from its initialisation"]["result"] == "PASS"
    assert 0 <= report["heldout"]["fvu"] and report["splice"]["n_predictions"] > 0
    assert report["splice"]["ce_clean"] <= report["splice"]["ce_zero"] + 1.0
    low, high = report["splice"]["delta_ce_ci95"]  # every ΔCE, KL and CE recovered has its interval over texts
    assert low <= report["splice"]["delta_ce"] <= high and report["splice"]["model_dtype"] == "float32"
    assert "95% CI" in executed.with_suffix(".html").read_text()
    # the smoke texts have no label fields: sparse probing says so in one line, and the verdict stands without it
    assert report["sparse_probing"]["skipped"].startswith("sparse probing skipped") and "\n" not in report["sparse_probing"]["skipped"]
    for figure in ("training_curves", "l0_distribution", "weights_vs_init", "decoder_geometry",
                   "reconstruction_error", "latent_frequency", "cross_entropy"):
        assert (store / "figures" / f"{figure}.png").stat().st_size > 1000



def _excluded_ids(tokenizer) -> torch.Tensor:
    """The token ids config.py's EXCLUDE_TOKENS default (BOS and padding) leaves out of every figure."""
    return torch.tensor([i for i in (tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None])


def _independent_ce(settings, sae: TopKSAE, mean: torch.Tensor) -> dict[str, float]:
    """Next-token CE over the evaluation texts, one text at a time (no padding), in float64: clean, with the
    layer's output replaced by the SAE's reconstruction, and by the training rows' mean."""
    model, tokenizer = load_model(settings.MODEL_ID)
    layer = resolve_layer(model, settings.LAYER_SIGNATURE)
    excluded = _excluded_ids(tokenizer)
    replacements = {"sae": lambda h: sae(h.reshape(-1, sae.d_in)).reshape(h.shape),
                    "mean": lambda h: mean.expand_as(h).to(h.dtype)}
    nll, count = {"clean": 0.0, "sae": 0.0, "mean": 0.0}, 0
    for text in load_role_texts(settings, "eval").texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=settings.MAX_LENGTH).input_ids
        targets = ids[0, 1:]
        kept = torch.isin(ids, excluded).unsqueeze(-1)  # EXCLUDE_TOKENS' positions keep the model's own output
        with torch.no_grad():
            for name in nll:
                handle = (layer.register_forward_hook(lambda m, i, o, f=replacements[name]: torch.where(kept, o, f(o)))
                          if name != "clean" else None)
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                if handle:
                    handle.remove()
                nll[name] -= float(logp[torch.arange(len(targets)), targets].sum())
        count += len(targets)
    return {name: total / count for name, total in nll.items()}


def test_stage_03_figures_and_verdict_agree_with_an_independent_pass(stage_03):
    """Held-out FVU and dead share from the held-out rows themselves, ΔCE and CE recovered from a plain
    float64 forward over the evaluation texts, and every check's PASS/FAIL from its value and config.py's
    threshold: none of it read from the code that wrote analysis.json."""
    args, _, report = stage_03
    settings = load_settings(args)
    run = open_run(settings.store)
    sae, _ = TopKSAE.load(settings.store / "sae_model" / "topk_sae.pt")
    assert settings.EXCLUDE_TOKENS == ["bos", "pad"]
    excluded = _excluded_ids(load_model(settings.MODEL_ID)[1])
    counted = ~torch.isin(torch.from_numpy(run.tokens()[:, 0].astype("int64")), excluded)
    start = run.heldout_start(settings.HELDOUT_FRACTION)
    x = torch.from_numpy(run.rows(start, run.n_tokens))[counted[start:]].double()
    with torch.no_grad():
        values, indices = sae.encode(x.float())
        x_hat = sae.decode(values, indices).double()
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    fired = torch.zeros(sae.n_latents, dtype=torch.bool)
    fired[indices[values > 0]] = True
    dead_fraction = 1 - float(fired.double().mean())
    checks = {c["check"]: c for c in report["checks"]}
    assert abs(report["heldout"]["fvu"] - fvu) < 1e-4 and abs(checks["held-out FVU"]["value"] - fvu) < 1e-4
    assert abs(checks["dead latents (held-out)"]["value"] - dead_fraction) < 1e-9

    mean = torch.from_numpy(run.rows(0, start))[counted[:start]].double().mean(0).float()
    ce = _independent_ce(settings, sae, mean)
    assert abs(checks["delta CE (nats)"]["value"] - (ce["sae"] - ce["clean"])) < 1e-4
    recovered = (ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"])
    assert abs(checks["CE-loss recovered vs mean-ablation"]["value"] - recovered) < 1e-4 / abs(ce["mean"] - ce["clean"])

    limits = {"held-out FVU": fvu <= settings.MAX_HELDOUT_FVU,
              "dead latents (held-out)": dead_fraction <= settings.MAX_DEAD_FRACTION,
              "delta CE (nats)": ce["sae"] - ce["clean"] <= settings.MAX_DELTA_CE,
              "L0 equals TOP_K": abs(float((values > 0).sum(1).double().mean()) - sae.k) <= 0.01 * sae.k}
    for name, ok in limits.items():
        assert checks[name]["result"] == ("PASS" if ok else "FAIL"), name
    assert report["passed"] == all(c["result"] != "FAIL" for c in report["checks"])


def test_stage_03_fails_a_broken_sae(stage_03, tmp_path):
    """The same SAE with its decoder scrambled, read through SAE_PATH: stage 03's verdict is FAIL, on FVU."""
    from saekit.training.saelens_format import load_saelens, save_saelens

    args, _, _ = stage_03
    settings = load_settings(args)
    sae, _ = load_saelens(settings.store / "sae_model" / "saelens")
    with torch.no_grad():
        sae.W_dec.copy_(sae.W_dec[torch.randperm(sae.n_latents, generator=torch.Generator().manual_seed(0))])
    folder = save_saelens(sae, tmp_path / "broken", settings.MODEL_ID, settings.LAYER_SIGNATURE)
    broken_args = copy_store(args, tmp_path / "store", "analysis.json", "notebooks") + [f"--SAE_PATH={folder}"]
    run_notebook(ROOT / "03_analyze_training.ipynb", broken_args)
    report = json.loads((store_of(broken_args) / "analysis.json").read_text())
    checks = {c["check"]: c for c in report["checks"]}
    assert report["passed"] is False and checks["held-out FVU"]["result"] == "FAIL"


def test_notebooks_are_committed_without_outputs():
    for notebook in ROOT.glob("*.ipynb"):
        cells = json.loads(Path(notebook).read_text())["cells"]
        assert not any(c.get("outputs") or c.get("execution_count") for c in cells if c["cell_type"] == "code"), notebook


def test_stage_03_run_from_the_shell_ends_with_the_verdict(smoke_args, tmp_path):
    """make demo's log said neither PASS nor FAIL: the runner now ends stage 03 with the verdict and
    each failing check, taken from the analysis.json it has just written."""
    from saekit.evaluation.verdict import terminal_lines

    args = copy_store(smoke_args, tmp_path / "store")
    proc = run_python(["-m", "saekit.notebooks", "03_analyze_training.ipynb", *args])
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = terminal_lines(json.loads((tmp_path / "store" / "analysis.json").read_text()))
    assert proc.stdout.rstrip("\n").splitlines()[-len(expected):] == expected
    assert expected[0].startswith(("stage 03 verdict: PASS", "stage 03 verdict: FAIL"))
