"""Stage 01 speed: the project's activation saving against a bare forward stopped at the same layer
(the practical limit) and against mi_crow's save_activations_dataset, on the same texts, batches
and model, in one run. Tokens/s counts real (non-padding) tokens for all three.

    .venv/bin/python bench/bench_save_activations.py [--texts=200] [--repeats=2] [any setting]
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

from common import save_result, table, timer

from saekit.activations.data import load_texts
from saekit.activations.models import forward_to_layer, load_model, resolve_layer
from saekit.activations.store import save_activations
from saekit.base.settings import load_settings

ap = argparse.ArgumentParser()
ap.add_argument("--texts", type=int, default=200)
ap.add_argument("--repeats", type=int, default=2)
args, setting_args = ap.parse_known_args()  # the rest are settings: --KEY=value

settings = load_settings(setting_args)
model, tokenizer = load_model(settings.MODEL_ID, "cpu", cache_dir=settings.store / "models")
layer = resolve_layer(model, settings.LAYER_SIGNATURE)
texts = load_texts(settings.HF_DATASET, settings.DATA_SPLIT, settings.TEXT_FIELD, args.texts).texts
batch, max_length = settings.BATCH_SIZE_SAVE, settings.MAX_LENGTH
n_tokens = sum(len(tokenizer(t, truncation=True, max_length=max_length).input_ids) for t in texts)


def bare_forward():
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tokenizer(texts[start:start + batch], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            forward_to_layer(model, layer, enc.input_ids, enc.attention_mask)


def ours():
    with tempfile.TemporaryDirectory() as tmp:
        save_activations(model, tokenizer, texts, settings.LAYER_SIGNATURE, Path(tmp), max_length=max_length,
                         batch_size=batch, dtype=settings.ACTIVATION_DTYPE, progress=False)


def mi_crow():
    import datasets
    from mi_crow.datasets import TextDataset
    from mi_crow.language_model.language_model import LanguageModel
    from mi_crow.store.local_store import LocalStore

    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(base_path=tmp)
        lm = LanguageModel(model, tokenizer, store, model_id="smollm2-135m", device="cpu")
        dataset = TextDataset(datasets.Dataset.from_dict({"text": texts}), store=store)
        lm.activations.save_activations_dataset(dataset, layer_signature=settings.LAYER_SIGNATURE,
                                                batch_size=batch, max_length=max_length, autocast=False)


runs = {"bare forward (limit)": bare_forward, "saekit stage 01": ours, "mi_crow save_activations_dataset": mi_crow}
bare_forward()  # warm-up: first-call allocations
rows = []
for name, fn in runs.items():
    best = float("inf")
    for _ in range(args.repeats):
        with timer() as t:
            fn()
        best = min(best, t["seconds"])
    rows.append({"method": name, "seconds": best, "tokens_per_s": n_tokens / best})
limit, saekit, mi = (r["tokens_per_s"] for r in rows)
for r in rows:
    r["vs_bare"] = r["tokens_per_s"] / limit
    r["vs_mi_crow"] = r["tokens_per_s"] / mi
print(f"{len(texts)} texts, {n_tokens} real tokens, batch {batch}, max_length {max_length}, best of {args.repeats}")
print(table(rows, ["method", "seconds", "tokens_per_s", "vs_bare", "vs_mi_crow"]))
print(f"goal: >= 0.9x bare forward ({saekit / limit:.2f}x) and >= 1.3x mi_crow ({saekit / mi:.2f}x)")
save_result("save_activations", "python bench/bench_save_activations.py " + " ".join(sys.argv[1:]),
            {"texts": len(texts), "tokens": n_tokens, "rows": rows})
