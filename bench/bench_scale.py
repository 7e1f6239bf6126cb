"""Scale: does memory stay flat as the run grows, and what do 2 processes (torchrun) give?

Stage 01 embeds a stream of synthetic texts with a random 1-block Llama of the embedded model's
width (d = 576) into a store of SMALL and then LARGE tokens; stage 02 trains one epoch on each
store. Each measured step runs in a fresh process (under torchrun for 2 processes), so its peak RSS
is its own. On this 2-core machine 2 processes are not expected to be faster: the figures say what
the distributed code costs when there is nothing to gain.

    .venv/bin/python bench/bench_scale.py [--small=500000] [--large=5000000] [--procs=1,2] [--large_procs=1] [--workdir=DIR]
    python3 bench/bench_scale.py --device=cuda --procs=1        # on one GPU

Memory is compared between the stores at 1 process; 1 and 2 processes on the small store (the
large one at 2 processes too with --large_procs=1,2, which doubles the run time).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, save_result, table

D_MODEL, TOKENS_PER_TEXT = 576, 128
WORDS = [f"w{i}" for i in range(2000)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="[UNK]")


def make_model_dir(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 4, hidden_size=D_MODEL, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)


def write_texts(path: Path, n_tokens: int) -> None:
    """Texts of TOKENS_PER_TEXT - 1 random words (plus BOS), written as a stream."""
    import numpy as np

    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for _ in range(n_tokens // TOKENS_PER_TEXT):
            f.write(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), TOKENS_PER_TEXT - 1)) + "\n")


def child(stage: str, args: list[str]) -> None:
    """One measured step, in its own process; prints a JSON line with its figures."""
    from saekit.activations.stage import load_stage_model, stage_runtime
    from saekit.base.distributed import leave_world
    from saekit.base.settings import load_settings

    settings = load_settings(args)
    device, world = stage_runtime(settings)
    started = time.perf_counter()
    if stage == "01":
        from saekit.activations.data import open_role_texts
        from saekit.activations.store import save_activations

        model, tokenizer = load_stage_model(settings, device, world)
        run_dir = save_activations(model, tokenizer, open_role_texts(settings, "train"), settings.LAYER_SIGNATURE,
                                   settings.store, max_length=settings.MAX_LENGTH, batch_size=settings.BATCH_SIZE_SAVE,
                                   shard_tokens=settings.SHARD_TOKENS, metadata={"model_id": settings.MODEL_ID},
                                   progress=False, world=world)
        tokens = json.loads((run_dir / "metadata.json").read_text())["n_tokens"]
    else:
        from saekit.activations.store import open_run
        from saekit.training.train import TrainConfig, train_sae

        run = open_run(settings.store)
        _, record = train_sae(run, TrainConfig.from_settings(settings), device=device, progress=False, world=world)
        tokens = record["history"][-1]["train_tokens"]
    seconds = time.perf_counter() - started
    result = Path(os.environ["SCALE_RESULTS"]) / f"rank{world.rank}.json"
    result.write_text(json.dumps({"rank": world.rank, "tokens": tokens, "seconds": seconds,
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    leave_world(world)


def measure(stage: str, args: list[str], nproc: int) -> dict:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    with tempfile.TemporaryDirectory() as results:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc)), "SCALE_RESULTS": results}
        proc = subprocess.run([*launcher, __file__, "--child", stage, *args], cwd=ROOT, capture_output=True,
                              text=True, env=env)
        if proc.returncode:
            sys.exit(f"stage {stage} with {nproc} process(es) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        ranks = [json.loads(p.read_text()) for p in sorted(Path(results).glob("rank*.json"))]
    seconds = max(r["seconds"] for r in ranks)
    return {"stage": stage, "processes": nproc, "tokens": ranks[0]["tokens"], "seconds": seconds,
            "tokens_per_s": ranks[0]["tokens"] / seconds, "peak_rss_mb_per_process": max(r["peak_rss_mb"] for r in ranks),
            "peak_rss_mb_all": sum(r["peak_rss_mb"] for r in ranks)}


def main() -> None:
    options = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    sizes = {"small": int(options.get("small", 500_000)), "large": int(options.get("large", 5_000_000))}
    device = options.get("device", "cpu")
    procs = {"small": [int(n) for n in options.get("procs", "1,2").split(",")],
             "large": [int(n) for n in options.get("large_procs", "1").split(",")]}
    with tempfile.TemporaryDirectory(dir=options.get("workdir")) as tmp:  # the stores take ~6 GB at 5M tokens
        tmp = Path(tmp)
        make_model_dir(tmp / "model")
        rows = []
        for name, n_tokens in sizes.items():
            write_texts(tmp / f"{name}.txt", n_tokens)
            for nproc in procs[name]:
                store = tmp / f"store_{name}_{nproc}"
                args = [f"--MODEL_ID={tmp / 'model'}", "--LAYER_SIGNATURE=llamaforcausallm_model_layers_0_post_attention_layernorm",
                        f"--HF_DATASET={tmp / f'{name}.txt'}", "--EVAL_SHARE=0.01", "--DATA_LIMIT=0",
                        f"--MAX_LENGTH={TOKENS_PER_TEXT}", "--BATCH_SIZE_SAVE=64", f"--DEVICE={device}", "--EPOCHS=1",
                        f"--STORE_DIR={store}"]
                for stage in ("01", "02"):
                    row = {"store": name, **measure(stage, args, nproc)}
                    rows.append(row)
                    print(table([row], list(row)), flush=True)
    columns = ["store", "stage", "processes", "tokens", "seconds", "tokens_per_s", "peak_rss_mb_per_process",
               "peak_rss_mb_all"]
    print(table(rows, columns))
    path = save_result("scale" if device == "cpu" else f"scale_{device}",
                       "python bench/bench_scale.py " + " ".join(sys.argv[1:]),
                       {"device": device, "sizes": sizes, "d_model": D_MODEL, "model": "random 1-block Llama, d=576", "rows": rows,
                        "cpu_count": os.cpu_count()})
    print(f"wrote {path}")


if __name__ == "__main__":
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        child(sys.argv[i + 1], sys.argv[i + 2:])
    else:
        main()
