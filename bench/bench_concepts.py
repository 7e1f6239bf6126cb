"""Stage 04 speed: the project's concept collection against mi_crow's text tracking (the
specification's register_hook + enable_text_tracking), on the same trained SAE, texts and batch
size, in one run. Also counts the latents each gives "top texts": mi_crow ranks by pre-activation,
so latents that never fire (dead) get texts too.

    .venv/bin/python bench/bench_concepts.py [--texts=64] [any setting]
"""
import argparse
import sys
import tempfile

import torch

from common import save_result, table, timer

from saekit.activations.data import load_texts
from saekit.activations.models import load_model, resolve_layer
from saekit.base.settings import load_settings
from saekit.concepts.collect import collect, text_peaks, top_peaks
from saekit.training.sae import TopKSAE

ap = argparse.ArgumentParser()
ap.add_argument("--texts", type=int, default=64)
args, setting_args = ap.parse_known_args()  # the rest are settings: --KEY=value

settings = load_settings(setting_args)
model, tokenizer = load_model(settings.MODEL_ID, "cpu", cache_dir=settings.store / "models")
layer = resolve_layer(model, settings.LAYER_SIGNATURE)
sae, meta = TopKSAE.load(settings.store / "sae_model" / "topk_sae.pt")
texts = load_texts(settings.HF_DATASET, settings.EVAL_SPLIT, settings.TEXT_FIELD, args.texts).texts
batch, max_length, top_n = settings.BATCH_SIZE_SAVE, settings.MAX_LENGTH, settings.TOP_N_EXAMPLES
n_tokens = sum(len(tokenizer(t, truncation=True, max_length=max_length).input_ids) for t in texts)

with timer() as t_ours:
    codes = collect(model, tokenizer, layer, sae, texts, max_length=max_length, batch_size=batch, progress=False)
    top_peaks(text_peaks(codes), top_n, sae.n_latents)  # the top texts, as mi_crow's tracker keeps them
ours_live = len(set(codes.firing[1].tolist()))


def mi_crow_tracking():
    from mi_crow.language_model.language_model import LanguageModel
    from mi_crow.mechanistic.sae.modules.topk_sae import TopKSae
    from mi_crow.store.local_store import LocalStore

    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(base_path=tmp)
        lm = LanguageModel(model, tokenizer, store, model_id="smollm2-135m", device="cpu")
        mc = TopKSae(n_latents=sae.n_latents, n_inputs=sae.d_in, device="cpu", store=store)
        mc.sae_engine.top_k = sae.k  # its constructor ignores k (observations.md)
        with torch.no_grad():  # the same encoder: W_enc (x - b_dec) + b_enc = W_enc x + (b_enc - W_enc b_dec)
            mc.sae_engine.encoder.final_block[0].weight.copy_(sae.W_enc)
            mc.sae_engine.encoder.final_block[0].bias.copy_(sae.b_enc - sae.W_enc @ sae.b_dec)
            mc.sae_engine.dictionary._weights.copy_(sae.W_dec)
        lm.layers.register_hook(settings.LAYER_SIGNATURE, mc)
        mc.context.text_tracking_k = top_n
        mc.concepts.enable_text_tracking()
        with torch.inference_mode():
            for start in range(0, len(texts), batch):
                lm.inference.execute_inference(texts[start:start + batch], autocast=False, tok_kwargs={
                    "max_length": max_length, "padding": True, "truncation": True, "add_special_tokens": True})
        return sum(1 for heap in mc.concepts.get_all_top_texts() if heap)


with timer() as t_mi:
    mi_live = mi_crow_tracking()
rows = [{"method": "saekit stage 04 collect", "seconds": t_ours["seconds"], "tokens_per_s": n_tokens / t_ours["seconds"],
         "latents_with_top_texts": ours_live},
        {"method": "mi_crow text tracking", "seconds": t_mi["seconds"], "tokens_per_s": n_tokens / t_mi["seconds"],
         "latents_with_top_texts": mi_live}]
speedup = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
print(f"{len(texts)} texts, {n_tokens} tokens, batch {batch}, top {top_n}; SAE {sae.n_latents} latents, k={sae.k}")
print(table(rows, ["method", "seconds", "tokens_per_s", "latents_with_top_texts"]))
print(f"goal: >= 3x mi_crow ({speedup:.1f}x); latents that fire on these texts: {ours_live} of {sae.n_latents}")
save_result("concepts", "python bench/bench_concepts.py " + " ".join(sys.argv[1:]),
            {"texts": len(texts), "tokens": n_tokens, "rows": rows, "speedup": speedup})
