"""Stage 02's GPU path measured in one run, for the first minutes on a lent GPU (issue 33): one JSON.

    python bench/gpu_check.py --out=$OUT          # on a GPU: about 5-9 minutes
    .venv/bin/python bench/gpu_check.py --small   # on a CPU, tiny sizes, under a minute: keeps the script alive

Sections, each timed alone and kept when another fails (its error is recorded instead):
- `device`: the bf16 matmul peak, and host-to-device copy bandwidth from pageable and from pinned memory.
- `steps`: training steps only, data made on the device: TopK k = 8/32/64 and BatchTopK k = 8/64 at
  batch 4,096 and 1,024, with and without BOS-like outlier rows (every 128th row 50x the others), for
  each kernel path: `sparse` (the old kernels: gathered rows and index_add_), `dense`, and `dense`
  choosing in float32 (TF32; no bfloat16 proposal to re-score). Each: ms a step, tokens/s, TFLOP/s
  and its fraction of the bf16 peak (saekit.training.train.step_flops_per_token), peak memory
  (torch.cuda.max_memory_allocated, less the data) against what the memory check counts; and a
  short profile (top ops by device time) of the old and the new kernels at k = 8 and 64.
- `store`: structured activations of width d written to a store, then one epoch read alone (with
  and without the background read-ahead), and one epoch of stage 02 from it (train_sae), against
  steps only at the same shape. The page cache is warm (the store was just written).
- `on_the_fly`: a random-weight Llama of the bielik preset's shape up to its layer 16 (17 layers,
  hidden 1,536, intermediate 8,960, 12 heads, 2 key-value heads), built on the device in bf16: the
  bare forward, the source alone (saekit.activations.sources.ModelRows) at forward batches of 16 and
  128 texts and of 16,384 tokens (FORWARD_BATCH_TOKENS's CUDA default), and with training steps, against
  steps only.

Timings on a GPU wait for the device (torch.cuda.synchronize) before the clock stops. With --small
the figures only show that every path runs; they measure nothing.
"""
from __future__ import annotations

import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from common import ROOT, save_result, table

FULL = dict(d=1536, multiplier=4, batches=(4096, 1024), steps=20, warmup=5, copy_mb=512, peak_n=8192,
            store_tokens=600_000, buffer=262_144, fly_tokens=300_000, layers=17, layer=16,
            model=dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2))
SMALL = dict(d=32, multiplier=4, batches=(64,), steps=2, warmup=1, copy_mb=8, peak_n=256,
             store_tokens=6_000, buffer=2048, fly_tokens=2_000, layers=2, layer=1,
             model=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2))
CASES = [("topk", 8), ("topk", 32), ("topk", 64), ("batchtopk", 8), ("batchtopk", 64)]
# (name, KERNELS, SELECT_DTYPE): the old kernels, the new ones, and the new ones choosing in float32 (TF32)
KERNEL_VARIANTS = [("old: sparse", "sparse", "auto"), ("new: dense", "dense", "auto"), ("new: dense, float32 choice", "dense", "float32")]
OUTLIER_EVERY, OUTLIER_SCALE = 128, 50.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def bf16_peak_tflops(device: torch.device, n: int, repeats: int = 20) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start = clock(device)
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (clock(device) - start) / 1e12


def copy_bandwidth(device: torch.device, megabytes: int) -> dict[str, Any]:
    """GB/s of a host-to-device copy from pageable memory, and from pinned memory with non_blocking."""
    host = torch.randn(megabytes * 2 ** 18)  # float32: 4 bytes each
    if device.type != "cuda":
        return {"note": "no CUDA device: nothing to copy to"}
    out = {}
    for name, source, non_blocking in (("pageable", host, False), ("pinned", host.pin_memory(), True)):
        source.to(device, non_blocking=non_blocking)
        start = clock(device)
        for _ in range(5):
            source.to(device, non_blocking=non_blocking)
        out[f"{name}_gb_per_s"] = 5 * host.numel() * 4 / (clock(device) - start) / 1e9
    return out


def config(architecture: str, k: int, batch: int, kernels: str, select: str, size: dict, **more):
    from saekit.base.settings import load_settings
    from saekit.training.train import TrainConfig

    return replace(TrainConfig.from_settings(load_settings([])), architecture=architecture, k=k, batch_size=batch,
                   n_latents_multiplier=size["multiplier"], kernels=kernels, select_dtype=select, **more)


def activations(n: int, d: int, device: torch.device, outliers: bool, seed: int = 0) -> torch.Tensor:
    """Rows like a layer's: an offset plus noise; with `outliers`, every OUTLIER_EVERY-th row (a
    document's first token, as BOS often is) OUTLIER_SCALE times larger."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, device=device, generator=g) + 0.5
    if outliers:
        x[::OUTLIER_EVERY] *= OUTLIER_SCALE
    return x


def counted_bytes(cfg, d: int, device: torch.device) -> int:
    """What the memory check counts for the SAE's state and a step (saekit.base.memory, step_memory)."""
    from saekit.base.memory import training_parts
    from saekit.training.train import step_memory

    parts = training_parts(d, cfg.n_latents_multiplier * d, cfg.batch_size, False)
    parts.pop("the held-out evaluation")
    return sum(parts.values()) + sum(step_memory(cfg, d, device).values())


def trainer_for(cfg, d: int, device: torch.device, sample: torch.Tensor):
    from saekit.base.distributed import World
    from saekit.training.train import _Trainer

    trainer = _Trainer(cfg, d, 10 ** 9, device, World())
    trainer.initialise(sample[:4096].float())  # on the device: its geometric median takes a moment there
    return trainer


def steps_only(cfg, d: int, device: torch.device, size: dict, outliers: bool, profile: bool = False) -> dict[str, Any]:
    from saekit.training.kernels import tf32
    from saekit.training.train import step_flops_per_token

    batch, n_latents = cfg.batch_size, cfg.n_latents_multiplier * d
    data = activations(4 * batch, d, device, outliers)
    batches = data.split(batch)
    with tf32(cfg.tf32, device):
        trainer = trainer_for(cfg, d, device, data)
        for i in range(size["warmup"]):
            trainer.step(batches[i % 4], i)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = clock(device)
        for i in range(size["steps"]):
            trainer.step(batches[i % 4], size["warmup"] + i)
        seconds = (clock(device) - start) / size["steps"]
        top = profile_steps(trainer, batches, device) if profile else None
    tokens_per_s = batch / seconds
    row = {"ms_per_step": 1000 * seconds, "tokens_per_s": tokens_per_s,
           "tflops": tokens_per_s * step_flops_per_token(d, n_latents, cfg.k) / 1e12,
           "memory_check_bytes": counted_bytes(cfg, d, device)}
    if device.type == "cuda":
        row["peak_bytes_less_data"] = torch.cuda.max_memory_allocated(device) - data.numel() * data.element_size()
    if top:
        row["profile"] = top
    return row


def profile_steps(trainer, batches, device: torch.device, n: int = 3) -> list[dict[str, Any]]:
    """The five ops that took the most device time (CPU time on a CPU) over n steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(n):
            trainer.step(batches[i % len(batches)], 1000 + i)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:5]
    return [{"op": e.key, "ms_per_step": getattr(e, key, 0) / 1000 / n} for e in ops]


def steps_section(device: torch.device, size: dict, peak: float | None) -> list[dict[str, Any]]:
    rows = []
    for architecture, k in CASES:
        for batch in size["batches"]:
            for outliers in (False, True):
                for name, kernels, select in KERNEL_VARIANTS:
                    cfg = config(architecture, k, batch, kernels, select, size)
                    profile = batch == size["batches"][0] and not outliers and architecture == "topk" and k in (8, 64) \
                        and name != KERNEL_VARIANTS[2][0]
                    row = {"architecture": architecture, "k": k, "batch": batch, "outliers": outliers, "kernels": name,
                           **steps_only(cfg, size["d"], device, size, outliers, profile)}
                    if peak:
                        row["fraction_of_bf16_peak"] = row["tflops"] / peak
                    rows.append(row)
                    print({key: value for key, value in row.items() if key != "profile"}, flush=True)
    return rows


def store_section(device: torch.device, size: dict, tmp: Path) -> dict[str, Any]:
    from bench_devices import structured_run

    from saekit.activations.sources import StoreRows, heldout_copies
    from saekit.training.train import train_sae

    d, batch = size["d"], size["batches"][0]
    run = structured_run(tmp / "store", size["store_tokens"], d, 4 * d)
    cfg = config("topk", 8, batch, "auto", "auto", size, epochs=1, shuffle_buffer_tokens=size["buffer"])
    heldout_start = run.heldout_start(cfg.heldout_fraction)

    def source(prefetch: bool) -> StoreRows:
        return StoreRows(run, 0, heldout_start, batch, size["buffer"], device, cfg.seed,
                         *heldout_copies(run, cfg.heldout_fraction)[::-1], prefetch=prefetch)

    out: dict[str, Any] = {"d": d, "tokens": run.n_tokens, "buffer": size["buffer"], "batch": batch}
    for prefetch in (False, True):
        rows, start = 0, clock(device)
        for rows_batch, _ in source(prefetch).epoch(0):
            rows += len(rows_batch)
        out[f"read_alone_tokens_per_s_prefetch_{prefetch}"] = rows / (clock(device) - start)
        _, record = train_sae(run, cfg, device=device, progress=False, source=source(prefetch))
        out[f"training_tokens_per_s_prefetch_{prefetch}"] = record["history"][0]["tokens_per_s"]
    steps = steps_only(cfg, d, device, size, outliers=False)
    out["steps_only_tokens_per_s"] = steps["tokens_per_s"]
    out["training_vs_steps_only"] = out["training_tokens_per_s_prefetch_True"] / steps["tokens_per_s"]
    return out


def on_the_fly_section(device: torch.device, size: dict, tmp: Path) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench_scale import TOKENS_PER_TEXT, WORDS, _tokenizer, write_texts
    from saekit.activations.models import length_sorted_batches, resolve_layer, write_document_activations
    from saekit.activations.sources import ModelRows, count_training_texts
    from saekit.training.kernels import tf32

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = LlamaConfig(vocab_size=len(WORDS) + 4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0, num_hidden_layers=size["layers"], **size["model"])
    torch.manual_seed(0)
    with torch.device(device):  # random weights made on the device, not copied there
        model = LlamaForCausalLM(shape).to(dtype).eval()
    tokenizer = _tokenizer()
    write_texts(tmp / "texts.txt", size["fly_tokens"])
    texts = (tmp / "texts.txt").read_text().splitlines()
    layer_name = f"llamaforcausallm_model_layers_{size['layer']}_post_attention_layernorm"
    layer = resolve_layer(model, layer_name)
    plan, _ = count_training_texts(texts, tokenizer, TOKENS_PER_TEXT, 0.01)
    d, batch = size["model"]["hidden_size"], size["batches"][0]
    out: dict[str, Any] = {"layers": size["layers"], "stopped_after_layer": size["layer"], "d": d,
                           "tokens": plan.n_tokens, "dtype": str(dtype)}

    docs = tokenizer(texts, truncation=True, max_length=TOKENS_PER_TEXT)["input_ids"]
    lengths = [len(doc) for doc in docs]
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    with torch.no_grad():
        rows_out = torch.empty(offsets[-1], d, device=device)
        start = clock(device)
        write_document_activations(rows_out, offsets, model, tokenizer, layer, docs, length_sorted_batches(lengths, 128))
        out["bare_forward_tokens_per_s_batch_128"] = offsets[-1] / (clock(device) - start)
        del rows_out

    def source(forward_batch: int, forward_tokens: int = 0) -> ModelRows:
        return ModelRows(model, tokenizer, layer, texts, plan, d=d, max_length=TOKENS_PER_TEXT,
                         forward_batch=forward_batch, batch_size=batch, buffer_tokens=size["buffer"],
                         dtype="float16", device=device, seed=0, forward_tokens=forward_tokens)

    # 16 texts (the CPU default), 128, and FORWARD_BATCH_TOKENS's CUDA default of 16,384 tokens a batch
    forward_batches = {"forward_batch_16": (16, 0), "forward_batch_128": (128, 0), "forward_tokens_16384": (16, 16384)}
    with torch.no_grad():
        for label, (forward_batch, forward_tokens) in forward_batches.items():
            rows, start = 0, clock(device)
            for rows_batch, _ in source(forward_batch, forward_tokens).epoch(0):
                rows += len(rows_batch)
            out[f"source_alone_tokens_per_s_{label}"] = rows / (clock(device) - start)
    cfg = config("topk", 8, batch, "auto", "auto", size)
    rows_source = source(128)
    trainer = trainer_for(cfg, d, device, rows_source.sample().to(device))
    rows, start = 0, clock(device)
    with tf32(cfg.tf32, device):  # as train_sae runs its steps
        for step, (rows_batch, _) in enumerate(rows_source.epoch(0)):
            trainer.step(rows_batch, step)
            rows += len(rows_batch)
    out["training_tokens_per_s_forward_batch_128"] = rows / (clock(device) - start)
    steps = steps_only(cfg, d, device, size, outliers=False)
    out["steps_only_tokens_per_s"] = steps["tokens_per_s"]
    out["training_vs_steps_only"] = out["training_tokens_per_s_forward_batch_128"] / steps["tokens_per_s"]
    return out


def timed(result: dict[str, Any], name: str, work: Callable[[], Any]) -> None:
    """result[name] = work(), or the error it raised: one section failing keeps the others' figures."""
    start = time.perf_counter()
    try:
        result[name] = work()
    except Exception as err:  # a first run on a new device: record what broke and go on
        result[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=6)}
        print(f"{name} failed: {type(err).__name__}: {err}", flush=True)
    result.setdefault("seconds", {})[name] = time.perf_counter() - start


def main(argv: list[str]) -> dict[str, Any]:
    small = "--small" in argv
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    device = torch.device(options.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    size = SMALL if small else FULL
    if small:
        torch.set_num_threads(1)  # tiny products: more threads only contend (CI machines are often shared)
    result: dict[str, Any] = {"device": str(device), "small": small, "sizes": {k: v for k, v in size.items()}}
    if device.type == "cpu":
        result["cpu_note"] = "a CPU: the figures show that every path runs, not how fast a GPU is"
    timed(result, "bf16_peak_tflops", lambda: bf16_peak_tflops(device, size["peak_n"]))
    peak = result["bf16_peak_tflops"] if isinstance(result["bf16_peak_tflops"], float) else None
    timed(result, "copy", lambda: copy_bandwidth(device, size["copy_mb"]))
    timed(result, "steps", lambda: steps_section(device, size, peak))
    with tempfile.TemporaryDirectory(dir=options.get("workdir")) as tmp:
        timed(result, "store", lambda: store_section(device, size, Path(tmp)))
        timed(result, "on_the_fly", lambda: on_the_fly_section(device, size, Path(tmp)))
    if isinstance(result["steps"], list):
        print(table(result["steps"], ["architecture", "k", "batch", "outliers", "kernels", "ms_per_step", "tokens_per_s",
                                      "tflops", "fraction_of_bf16_peak", "peak_bytes_less_data", "memory_check_bytes"]))
    for name in ("store", "on_the_fly"):
        print(name, result[name])
    name = "gpu_check" + ("_small" if small else "")
    print(f"wrote {save_result(name, 'python bench/gpu_check.py ' + ' '.join(argv), result)}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    main(sys.argv[1:])
