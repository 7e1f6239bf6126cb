"""Does a bfloat16 forward speed stage 01 up on this CPU, and how far are its activations from
float32's? Both dtypes embed the same texts to the same layer, one after the other, in one run.

    .venv/bin/python bench/bench_model_dtype.py [--EVAL_DATA_LIMIT=64] [any setting]
"""
import sys

import torch

from common import save_result, table, timer

from saekit.activations.data import load_role_texts
from saekit.activations.models import forward_to_layer, load_model, resolve_layer
from saekit.base.settings import load_settings


def embed(model, tokenizer, layer, texts, max_length, batch_size):
    rows = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        hidden = forward_to_layer(model, layer, enc.input_ids, enc.attention_mask)
        rows.append(hidden[enc.attention_mask.bool()])
    return torch.cat(rows)


def main() -> None:
    settings = load_settings(sys.argv[1:] or ["--EVAL_DATA_LIMIT=64"])
    texts = load_role_texts(settings, "eval").texts
    results, acts = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = load_model(settings.MODEL_ID, "cpu", cache_dir=settings.store / "models", dtype=dtype)
        layer = resolve_layer(model, settings.LAYER_SIGNATURE)
        embed(model, tokenizer, layer, texts[:settings.BATCH_SIZE_SAVE], settings.MAX_LENGTH, settings.BATCH_SIZE_SAVE)
        with timer() as t:
            acts[dtype] = embed(model, tokenizer, layer, texts, settings.MAX_LENGTH, settings.BATCH_SIZE_SAVE)
        results.append({"dtype": str(dtype).removeprefix("torch."), "tokens": len(acts[dtype]), "seconds": t["seconds"],
                        "tokens_per_s": len(acts[dtype]) / t["seconds"]})
    reference, bf16 = acts[torch.float32], acts[torch.bfloat16]
    error = (bf16 - reference).norm(dim=1) / reference.norm(dim=1)
    variance = (reference - reference.mean(0)).pow(2).sum()
    results[1].update({"speed_vs_fp32": results[1]["tokens_per_s"] / results[0]["tokens_per_s"],
                       "relative_error_median": float(error.median()), "relative_error_max": float(error.max()),
                       "fvu_of_bf16_as_reconstruction": float((bf16 - reference).pow(2).sum() / variance)})
    print(f"{len(texts)} texts, {settings.MODEL_ID}, {settings.LAYER_SIGNATURE}, {torch.get_num_threads()} threads")
    print(table(results, ["dtype", "tokens", "seconds", "tokens_per_s", "speed_vs_fp32", "relative_error_median",
                          "relative_error_max", "fvu_of_bf16_as_reconstruction"]))
    path = save_result("model_dtype", "python bench/bench_model_dtype.py " + " ".join(sys.argv[1:]),
                       {"n_texts": len(texts), "rows": results, "cpu_capability": torch.backends.cpu.get_cpu_capability()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
