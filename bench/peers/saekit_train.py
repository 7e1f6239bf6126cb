"""Train this project's SAE (stage 02's trainer) for bench/bench_peers.py; run in the project's venv.

    .venv/bin/python bench/peers/saekit_train.py '<json spec>'

The spec names the output folder and the setting overrides (e.g. ["--TOP_K=16"]); the rows are the
store's run, as stage 02 reads them (with "exclude_tokens", EXCLUDE_TOKENS's rows left out, as stage 02
leaves them out). Only train_sae is timed. The SAE is written in SAELens's format
(saekit.training.saelens_format), like every peer's, so one scorer reads them all; a transcoder
(TRAIN_TARGET), which SAELens has no TopK form of, in this project's own file (sae.pt).
Prints one JSON line: train_seconds, tokens, settings.
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from saekit.activations.store import open_run  # noqa: E402
from saekit.base.settings import load_settings  # noqa: E402
from saekit.training.saelens_format import save_saelens  # noqa: E402
from saekit.training.train import TrainConfig, train_sae  # noqa: E402

# torch.optim's first optimizer imports torch._dynamo (1.6 s here), inside train_sae's timing; sparsify
# imports it with its own package, before its timed fit. Loaded here, neither trainer's time holds it.
import torch._dynamo  # noqa: E402,F401

spec = json.loads(sys.argv[1])
settings = load_settings(spec["overrides"])
run = open_run(settings.store)
if spec.get("exclude_tokens"):
    run.exclude_tokens(settings.EXCLUDE_TOKENS)
cfg = TrainConfig.from_settings(settings)
started = time.perf_counter()
sae, record = train_sae(run, cfg, progress=False)
seconds = time.perf_counter() - started
if sae.transcoder:
    sae.save(Path(spec["out"]) / "sae.pt", trainer="saekit", train_target=settings.TRAIN_TARGET)
else:
    save_saelens(sae, spec["out"], settings.MODEL_ID, settings.LAYER_SIGNATURE, {"trainer": "saekit"})
tokens = sum(h["train_tokens"] for h in record["history"])
print(json.dumps({"train_seconds": seconds, "tokens": tokens,
                  "settings": {"config": record["config"], "lr": record["lr"],
                               "dead_window_tokens": record["dead_window_tokens"], "k_aux": record["k_aux"]}}))
