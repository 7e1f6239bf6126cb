"""Production shapes on one device (meant for a GPU, through the device tool): stage 02 from the store
at the demo's shape and at Bielik's, with the SAE step's achieved TFLOP/s against the device's bf16
matmul peak measured in the same run; and training on the fly on a random-weight model of Bielik's
shape, against the bare forward up to the layer on the same texts.

    python3 bench/bench_gpu_scale.py                                   # on a GPU: the sizes below
    .venv/bin/python bench/bench_gpu_scale.py --device=cpu --tokens=20000 --layers=2   # a quick check here

- store: structured synthetic activations (bench_devices.structured_run) of width d, 4d latents,
  TopK 8, one epoch of TOKENS; tokens/s and the history's step TFLOP/s (saekit.training.train.step_flops_per_token).
- online: a random Llama of Bielik-1.5B's shape as far as it is known here (hidden 1,536, 32 layers,
  intermediate 8,960, 12 heads, 2 key-value heads; the hub's config.json was never read), stopped at
  block 16, over random texts of 128 tokens: stage 01 (ACTIVATION_SOURCE = model) then stage 02 for one
  epoch, against a bare forward to the layer over the same texts in the same batches.
Writes bench/results/gpu_scale[_<device>].json.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, save_result, table

BIELIK = dict(hidden_size=1536, num_hidden_layers=32, intermediate_size=8960, num_attention_heads=12,
              num_key_value_heads=2)
SHAPES = [(576, "demo"), (1536, "bielik")]


def bf16_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def from_store(device: torch.device, tokens: int, tmp: Path) -> list[dict]:
    from bench_devices import structured_run
    from saekit.base.settings import load_settings
    from saekit.training.train import TrainConfig, train_sae

    rows = []
    for d, name in SHAPES:
        run = structured_run(tmp / f"store_{name}", tokens, d, 4 * d)
        settings = load_settings(["--EPOCHS=1", f"--DEVICE={device.type}"])
        _, record = train_sae(run, TrainConfig.from_settings(settings), device=device, progress=False)
        last = record["history"][-1]
        rows.append({"shape": f"{name} (d {d}, {4 * d} latents)", "tokens_per_s": last["tokens_per_s"],
                     "step_tflops": last["step_tflops"], "heldout_fvu": last["heldout_fvu"]})
    return rows


def online(device: torch.device, tokens: int, layers: int, tmp: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench_online import stage
    from bench_scale import TOKENS_PER_TEXT, WORDS, _tokenizer, write_texts
    from saekit.activations.models import length_sorted_batches, load_model, resolve_layer, write_document_activations

    torch.manual_seed(0)
    shape = {**BIELIK, "num_hidden_layers": layers}
    config = LlamaConfig(vocab_size=len(WORDS) + 4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, **shape)
    LlamaForCausalLM(config).save_pretrained(tmp / "model")
    _tokenizer().save_pretrained(tmp / "model")
    write_texts(tmp / "texts.txt", tokens)
    layer = f"llamaforcausallm_model_layers_{layers // 2}_post_attention_layernorm"
    args = [f"--MODEL_ID={tmp / 'model'}", f"--LAYER_SIGNATURE={layer}", f"--HF_DATASET={tmp / 'texts.txt'}",
            "--EVAL_SHARE=0.01", "--DATA_LIMIT=0", f"--MAX_LENGTH={TOKENS_PER_TEXT}", "--BATCH_SIZE_SAVE=64",
            f"--DEVICE={device.type}", "--EPOCHS=1", "--ACTIVATION_SOURCE=model", f"--STORE_DIR={tmp / 'store'}"]
    s01, s02 = stage("01_save_activations.py", args), stage("02_train_sae.py", args)

    model, tokenizer = load_model(str(tmp / "model"), device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    texts = (tmp / "texts.txt").read_text().splitlines()
    docs = tokenizer(texts, truncation=True, max_length=TOKENS_PER_TEXT)["input_ids"]
    target = resolve_layer(model, layer)
    lengths = [len(d) for d in docs]
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    rows = torch.empty(offsets[-1], shape["hidden_size"], device=device)
    start = time.perf_counter()
    with torch.no_grad():
        write_document_activations(rows, offsets, model, tokenizer, target, docs, length_sorted_batches(lengths, 64))
    if device.type == "cuda":
        torch.cuda.synchronize()
    bare = sum(map(len, docs)) / (time.perf_counter() - start)
    flow = sum(map(len, docs)) / (s01["seconds"] + s02["seconds"])
    return {"layers": layers, "stopped_at": layers // 2, "tokens": sum(map(len, docs)), "bare_forward_tokens_per_s": bare,
            "on_the_fly_tokens_per_s": flow, "speed_vs_bare_forward": flow / bare,
            "seconds_01": s01["seconds"], "seconds_02": s02["seconds"]}


def main() -> None:
    options = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    device = torch.device(options.get("device", "cuda"))
    tokens, layers = int(options.get("tokens", 2_000_000)), int(options.get("layers", 32))
    peak = bf16_peak_tflops(device)
    with tempfile.TemporaryDirectory(dir=options.get("workdir")) as tmp:
        rows = from_store(device, tokens, Path(tmp))
        for row in rows:
            row["fraction_of_bf16_peak"] = row["step_tflops"] / peak
        print(f"bf16 matmul peak measured: {peak:.1f} TFLOP/s")
        print(table(rows, ["shape", "tokens_per_s", "step_tflops", "fraction_of_bf16_peak", "heldout_fvu"]))
        fly = online(device, tokens, layers, Path(tmp))
        print(fly)
    name = "gpu_scale" + ("" if device.type == "cuda" else f"_{device.type}")
    print(f"wrote {save_result(name, 'python bench/bench_gpu_scale.py ' + ' '.join(sys.argv[1:]), {'device': str(device), 'bf16_peak_tflops': peak, 'store': rows, 'online': fly})}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    main()
