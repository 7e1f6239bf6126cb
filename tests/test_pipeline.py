"""Each architecture other than the default through stages 02 -> 03 -> 04 on the smoke artifacts, as
`make demo ARGS="--ARCHITECTURE=..."` runs it (TopK goes through them in the smoke fixture itself)."""
import json

import pytest
import torch

from conftest import ROOT, copy_store, run_stage
from saekit.base.settings import load_settings
from saekit.concepts.exports import open_concepts
from saekit.notebooks import run_notebook
from saekit.training.saelens_format import load_saelens
from saekit.training.sae import TopKSAE

CASES = ["matryoshka"]


@pytest.mark.parametrize("architecture", CASES)
def test_an_architecture_trains_is_judged_and_named(smoke_args, tmp_path, architecture):
    args = copy_store(smoke_args, tmp_path / "store", "sae_model", "concepts", "neuronpedia") + [
        f"--ARCHITECTURE={architecture}"]
    run_stage("02_train_sae.py", args)
    store = load_settings(args).store
    sae, metadata = TopKSAE.load(store / "sae_model" / "topk_sae.pt")
    assert sae.architecture == architecture
    exported, cfg = load_saelens(store / "sae_model" / "saelens")
    assert cfg["metadata"]["trained_architecture"] == architecture and _same_weights(exported, sae)

    run_notebook(ROOT / "03_analyze_training.ipynb", args)
    report = json.loads((store / "analysis.json").read_text())
    checks = {c["check"]: c["result"] for c in report["checks"]}
    assert "mean L0 near TOP_K" in checks and all(r in ("PASS", "FAIL", "N/A") for r in checks.values())
    assert report["passed"] == all(r != "FAIL" for r in checks.values())

    run_notebook(ROOT / "04_name_sae_concepts.ipynb", args)
    concepts, _, _ = open_concepts(store, metadata["sae_id"])
    assert concepts["meta"]["live_latents"] > 0 and len(concepts["latents"]) == concepts["meta"]["live_latents"]


def _same_weights(a: TopKSAE, b: TopKSAE) -> bool:
    """The same weights and threshold: what stages 03-05 read through SAE_PATH is the SAE stage 02 trained."""
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
