"""Stage 01 on the embedded SmolLM2-135M over a few stories: the real default path, end to end."""
import json

import numpy as np

from conftest import run_stage
from saekit.activations.store import open_run
from saekit.base.settings import load_settings


def test_stage01_on_the_embedded_model(tmp_path):
    stories = tmp_path / "few.jsonl"
    stories.write_text("\n".join(json.dumps({"text": t}) for t in [
        "Once upon a time, there was a little girl named Lily. She loved to play in the park.",
        "Tom found a red ball under the big tree. He was very happy and ran home to show his mom.",
        "   ",
        "The cat and the dog were friends. Every day they played together in the sun.",
    ]))
    # evaluation has its own file here, so training reads every story of this one (stage 01 checks it can be read)
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "The end of another story."}))
    args = [f"--HF_DATASET={stories}", f"--EVAL_DATASET={tmp_path / 'other.jsonl'}", f"--STORE_DIR={tmp_path / 'store'}",
            "--DATA_LIMIT=3", "--BATCH_SIZE_SAVE=2"]
    out = run_stage("01_save_activations.py", args).stdout
    assert "embedded 3 texts" in out and "1 empty or whitespace-only skipped" in out
    settings = load_settings(args)
    run = open_run(settings.store)
    assert run.meta["model_id"] == "embedded" and run.meta["layer_signature"] == settings.LAYER_SIGNATURE
    assert run.d_model == 576 and run.meta["dtype"] == "float16" and run.meta["n_documents"] == 3
    norms = np.linalg.norm(run.rows(0, run.n_tokens), axis=1)
    assert np.isfinite(norms).all() and 1 < np.median(norms) < 10  # post-norm activations, ~3.5 on story text
    assert (settings.store / "models" / "SmolLM2-135M-Instruct" / "config.json").exists()  # cached for later stages
    assert json.loads((settings.store / "settings" / "01_save_activations.json").read_text())["DATA_LIMIT"] == 3
