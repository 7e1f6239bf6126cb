"""Shared fixtures: a tiny randomly initialised Llama and a word-level tokenizer, built offline."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch

# no hub is reachable here or in CI: fail fast instead of retrying for half a minute
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STORIES = [
    "Once upon a time there was a little cat. The cat liked to play with a red ball.",
    "Tom had a big dog. One day the dog ran to the park and found a stick.",
    "Lily saw a bird in the tree. The bird sang a happy song and Lily smiled.",
    "The sun was warm. Ben and his mom went to the sea to swim and play in the sand.",
    "A small frog sat on a rock. It jumped into the pond with a big splash.",
    "Sara baked a cake with her dad. They shared it with their friends at school.",
    "The old bear was sleepy. He found a soft bed of leaves and went to sleep.",
    "Max lost his toy car. His sister helped him look, and they found it under the bed.",
]
TINY_LAYER = "llamaforcausallm_model_layers_1_post_attention_layernorm"


def _vocab() -> list[str]:
    words = sorted({w for s in STORIES for w in s.replace(".", " .").replace(",", " ,").split()})
    return ["<pad>", "<s>", "</s>", "[UNK]"] + words


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocab())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="[UNK]")


def make_tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_tiny_model(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, chat_tokenizer) -> Path:
    """The tiny model saved as a local transformers folder, as a hub download would be."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_model.save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


def make_synthetic_run(store_dir: Path, n_tokens: int = 6000, d: int = 16, n_features: int = 48,
                       active: int = 3, seed: int = 0, dtype: str = "float32", shard_tokens: int = 1000,
                       document_hashes: list[int] | None = None):
    """An activation run whose tokens are sparse sums of known unit directions (plus noise), in
    documents of 50 tokens: a TopK SAE with enough latents should reconstruct it almost perfectly."""
    from saekit.activations.store import RunWriter, open_run

    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    which = torch.stack([torch.randperm(n_features, generator=g)[:active] for _ in range(n_tokens)])
    coef = 0.5 + torch.rand(n_tokens, active, generator=g)
    x = (coef.unsqueeze(2) * features[which]).sum(1) + 0.01 * torch.randn(n_tokens, d, generator=g) + 0.3
    docs = torch.arange(n_tokens) // 50
    writer = RunWriter(store_dir, "synthetic", d, dtype, shard_tokens)
    writer.add(x, torch.zeros(n_tokens, dtype=torch.long), docs, torch.arange(n_tokens) % 50)
    writer.finish({"model_id": "synthetic", "layer_signature": "synthetic", "n_documents": int(docs[-1]) + 1},
                  document_hashes)
    return open_run(store_dir)


def run_stage(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run a stage script the way a user does; fail the test with its output if it fails."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def store_of(args: list[str]) -> Path:
    """The STORE_DIR that stage arguments name."""
    return Path(next(a.split("=", 1)[1] for a in args if a.startswith("--STORE_DIR=")))


def with_store(args: list[str], store: Path) -> list[str]:
    return [a for a in args if not a.startswith("--STORE_DIR=")] + [f"--STORE_DIR={store}"]


def copy_store(args: list[str], dest: Path, *ignore: str) -> list[str]:
    """A private copy of the store that `args` name (the model cache and `ignore` left out), and the
    same arguments pointing at it."""
    shutil.copytree(store_of(args), dest, ignore=shutil.ignore_patterns("models", *ignore))
    return with_store(args, dest)


@pytest.fixture(scope="session")
def smoke_args(tmp_path_factory, tiny_model_dir) -> list[str]:
    """Settings for a whole pipeline on the tiny model and the test stories, with stages 01-02 run."""
    folder = tmp_path_factory.mktemp("smoke")
    stories = folder / "stories.jsonl"
    # distinct documents: a split-less file is split between training and evaluation by document hash
    texts = STORIES + [f"{a} {b}" for a in STORIES for b in STORIES if a != b]
    stories.write_text("\n".join(json.dumps({"text": s}) for s in texts))
    args = [f"--MODEL_ID={tiny_model_dir}", f"--LAYER_SIGNATURE={TINY_LAYER}", f"--HF_DATASET={stories}",
            f"--STORE_DIR={folder / 'store'}", "--DATA_LIMIT=24", "--EVAL_DATA_LIMIT=8", "--MAX_LENGTH=24",
            "--EPOCHS=3", "--BATCH_SIZE_TRAIN=64", "--N_LATENTS_MULTIPLIER=2", "--TOP_K=4", "--WARMUP_STEPS=2",
            "--HELDOUT_FRACTION=0.25", "--EVAL_SHARE=0.25", "--DEVICE=cpu", "--TOP_N_EXAMPLES=3", "--N_LATENTS_TO_NAME=2",
            f"--NAMING_MODEL_ID={tiny_model_dir}", "--NAMING_MAX_NEW_TOKENS=4",
            "--CONTINUE_AFTER_FAIL=True"]  # a tiny SAE of 3 epochs may fail stage 03; the tests of 04-05 run on
    run_stage("01_save_activations.py", args)
    run_stage("02_train_sae.py", args)
    return args


@pytest.fixture(scope="session")
def chat_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with a minimal chat template, for the code paths that prompt a model."""
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", unk_token="[UNK]")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


class ChatStubHandler(BaseHTTPRequestHandler):
    """The base of the tests' OpenAI-compatible stub servers: quiet, lists one model (MODEL), and
    sends each reply whole with its length."""

    MODEL = "m"

    def log_message(self, *args):
        pass

    def send_body(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send_body(200, json.dumps({"object": "list", "data": [{"id": self.MODEL, "object": "model", "created": 0,
                                                                      "owned_by": "t"}]}).encode())
