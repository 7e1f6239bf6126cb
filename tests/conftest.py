"""Shared fixtures: a tiny randomly initialised Llama and a word-level tokenizer, built offline."""
from __future__ import annotations

import hashlib
import json
import os
import re
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

# Under pytest-xdist (`make test`: two worker processes) each worker takes its share of the cores, as
# the stage subprocesses that the tests start take one thread each (subprocess_env).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

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
                       edit_rows=None, document_hashes: list[int] | None = None, target=None):
    """An activation run whose tokens are sparse sums of known unit directions (plus noise), in documents of 50
    tokens: a TopK SAE with enough latents should reconstruct it almost perfectly. `edit_rows(x, docs)` may change
    the rows in place before they are written. `target(x, which, coef)` (the rows, and each row's features and
    their coefficients) gives a transcoder's target rows, stored beside them."""
    from saekit.activations.store import RunWriter, open_run

    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    which = torch.stack([torch.randperm(n_features, generator=g)[:active] for _ in range(n_tokens)])
    coef = 0.5 + torch.rand(n_tokens, active, generator=g)
    x = (coef.unsqueeze(2) * features[which]).sum(1) + 0.01 * torch.randn(n_tokens, d, generator=g) + 0.3
    docs = torch.arange(n_tokens) // 50
    if edit_rows is not None:
        edit_rows(x, docs)
    y = target(x, which, coef) if target is not None else None
    writer = RunWriter(store_dir, "synthetic", d, dtype, shard_tokens, d_target=0 if y is None else y.shape[1])
    writer.add(x, torch.zeros(n_tokens, dtype=torch.long), docs, torch.arange(n_tokens) % 50, y)
    writer.finish({"model_id": "synthetic", "layer_signature": "synthetic", "n_documents": int(docs[-1]) + 1,
                   **({} if y is None else {"target_signature": "synthetic_target"})}, document_hashes)
    return open_run(store_dir)


def alter_one_character(path: Path) -> None:
    """Change one letter or digit near the middle of a text file to another of its kind: the file stays valid
    JSON or CSV, so only its checksum can tell. In JSON the change must alter what the file says: a 17th
    significant digit that parses to the same float would leave the content, and its seal, as they were."""
    data = bytes(path.read_bytes())
    middle = len(data) // 2

    def altered(at: int) -> bytes:
        c = chr(data[at])
        new = ("7" if c != "7" else "3") if c.isdigit() else ("q" if c != "q" else "z")
        return data[:at] + new.encode() + data[at + 1:]

    def says_something_else(candidate: bytes) -> bool:
        if path.suffix != ".json":
            return True
        try:
            return json.loads(candidate) != json.loads(data)
        except ValueError:
            return False

    places = sorted((i for i, b in enumerate(data) if chr(b).isalnum()), key=lambda i: abs(i - middle))
    path.write_bytes(next(c for c in map(altered, places) if says_something_else(c)))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment every test subprocess runs in: one thread a process, as two processes share 2 cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_python(argv: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python ARGV...` in the project folder, as a user runs a stage, with its output captured."""
    return subprocess.run([sys.executable, *argv], cwd=kwargs.pop("cwd", ROOT), capture_output=True, text=True,
                          env=subprocess_env(**(env or {})), **kwargs)


def run_stage(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run a stage script the way a user does; fail the test with its output if it fails."""
    proc = run_python([str(ROOT / script), *args])
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def run_notebook_as_user(notebook: str, args: list[str]) -> Path:
    """Run a stage's notebook headless as a user does (python -m saekit.notebooks); fail the test with its
    output if it fails; return the executed copy."""
    proc = run_python(["-m", "saekit.notebooks", notebook, *args])
    assert proc.returncode == 0, f"{notebook} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return store_of(args) / "notebooks" / notebook


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


def checksums(store: Path, *skip: str) -> dict[str, str]:
    """SHA-256 of every file of a store (the model cache left out, and files whose name contains one of `skip`):
    the same before and after a stage means it wrote nothing."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*"))
            if p.is_file() and "models" not in p.relative_to(store).parts and not any(s in p.name for s in skip)}


def assert_one_line_error(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """A user's mistake ends the process with exit code 1 and one `error:` line, the last of its output, that says
    each of `expected`; no traceback. Returns that line."""
    # progress bars may come first; the error is the one line that ends the output
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "\x1b[" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def assert_offline(html: str) -> None:
    """Nothing in the page fetches from the network (URLs left in CSS comments fetch nothing)."""
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert not re.search(r"""import\s*\(?\s*["']https?:""", html)
    for cdn in ("cdnjs", "unpkg", "cdn.jsdelivr", "require.min.js", "MathJax", "widget-state+json"):
        assert cdn not in html, cdn


# What docs/scale.md promises of 2 processes against 1: the held-out metrics to 1e-4 (absolute below 1), the
# weights only to round-off that Adam magnifies (it scales a latent's rare, tiny gradients up to the step
# size): ~3e-4 in a few weights after the tiny run's 3 epochs (measured), up to 0.046 after 5 epochs on the
# demo's activations; a latent chosen differently anywhere would move weights by ~1e-1.
ROUND_OFF = dict(atol=1e-3, rtol=1e-3)


def torchrun(command: list[str], args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`command` under torchrun with `nproc` gloo processes on this machine; fail the test if it fails."""
    proc = run_python(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *command, *args])
    assert proc.returncode == 0, f"{command} under torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture()
def store_copy(tmp_path, smoke_args):
    """A private copy of the smoke pipeline's store (stages 01-02 done), and args pointing at it."""
    store = tmp_path / "store"
    return store, copy_store(smoke_args, store)


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
            "--EPOCHS=3", "--BATCH_SIZE_TRAIN=64", "--BATCH_SIZE_SAVE=3", "--N_LATENTS_MULTIPLIER=2", "--TOP_K=4", "--WARMUP_STEPS=2",
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


# --- stage 04's sets built in-process (test_concepts, test_neuronpedia, test_neuronpedia_bulk, test_output_side) --

CONCEPT_TEXTS = [f"{a} {b}" for a, b in zip(STORIES, STORIES[1:] + STORIES[:1])] * 2  # 16 texts, repeats included
SYNTHETIC_WORDS = ["the", "a", "kite", "ran", "dog", "puppy"] + [f"w{i}" for i in range(40)]
SYNTHETIC_WORD_ID = {w: i for i, w in enumerate(SYNTHETIC_WORDS)}


def concept_sae(d=32, n=64, k=4, dead=(5,), architecture=None):
    """A small SAE for the tiny model's layer whose latents fire often (and `dead` never), in eval mode."""
    from saekit.training.sae import TopKSAE

    torch.manual_seed(1)
    sae = (architecture or TopKSAE)(d, n, k)
    sae.init_weights(torch.zeros(d), torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_enc.mul_(3)
        for j in dead:  # never above zero: never wins a TopK slot with a positive value
            sae.W_enc[j] = 0
            sae.b_enc[j] = -100
    return sae.eval()


def collect_codes(model, tok, sae, texts=CONCEPT_TEXTS):
    """Stage 04's codes of `texts` at the tiny model's layer, in batches of 5."""
    from saekit.activations.models import resolve_layer
    from saekit.concepts.collect import collect

    return collect(model, tok, resolve_layer(model, TINY_LAYER), sae, texts, max_length=20, batch_size=5,
                   progress=False)


def build_concept_set(codes, model, tok, sae, **overrides):
    """Stage 04's set from `codes`, with small settings and the output side measured for 3 latents."""
    from saekit.activations.models import resolve_layer
    from saekit.concepts.exports import build_concepts
    from saekit.concepts.output_side import output_sides

    live = sorted(set(codes.firing[1].tolist()))
    settings = dict(top_n=3, context=2, per_quantile=1, non_activating=2, scoring_examples=4, max_keys=4, min_f1=0.3,
                    min_support=1)
    meta = {"model_id": "tiny", "layer_signature": TINY_LAYER, "sae_id": "sae-a", "k": sae.k}
    layer = resolve_layer(model, TINY_LAYER)
    sides, _ = output_sides(model, tok, layer, sae, live, live[:3], {i: 3.0 for i in live[:3]}, CONCEPT_TEXTS[:4], 8)
    return build_concepts(codes, sides, meta, **{**settings, **overrides})


def synthetic_concept_set(n_latents: int, sae_id: str = "sae-s"):
    """Stage 04's set from made-up codes of the Bielik preset's model and layer, latents 7 (kite) and 9 (dog,
    puppy) planted."""
    import numpy as np

    from saekit.concepts.exports import build_concepts
    from saekit.concepts.synthetic import synthetic_codes, synthetic_lens

    W = SYNTHETIC_WORD_ID
    planted = {7: lambda b, w, a: w == W["kite"], 9: lambda b, w, a: np.isin(w, [W["dog"], W["puppy"]])}
    codes = synthetic_codes(SYNTHETIC_WORDS, 30, 24, n_latents, 3, planted)
    live = sorted(set(codes.firing[1].tolist()))
    meta = {"model_id": "speakleash/Bielik-1.5B-v3.0-Instruct",
            "layer_signature": "llamaforcausallm_model_layers_16_post_attention_layernorm", "sae_id": sae_id, "k": 3,
            "dataset": "roneneldan/TinyStories"}
    return build_concepts(codes, synthetic_lens(SYNTHETIC_WORDS, live), meta, top_n=3, context=2, per_quantile=1,
                          non_activating=1, scoring_examples=6, max_keys=2, min_f1=0.3, min_support=1)


SAELENS_PYTHON = ROOT / "bench" / ".venv-saelens" / "bin" / "python"


def require_saelens_venv() -> None:
    """Skip a round trip through SAELens where its venv is absent; fail instead where
    SAEKIT_REQUIRE_SAELENS is set (CI builds the venv, .ci/run: there, missing is a failure)."""
    if not SAELENS_PYTHON.exists():
        message = "SAELens venv absent: make saelens-venv creates it"
        if os.environ.get("SAEKIT_REQUIRE_SAELENS"):
            pytest.fail(message)
        pytest.skip(message)


def saelens_forward(folder: Path, x: torch.Tensor, workdir: Path) -> tuple[str, torch.Tensor]:
    """SAELens itself (its venv) loads the exported `folder` with SAE.load_from_disk and applies it to `x`:
    (the class it loaded, its output)."""
    from safetensors.torch import load_file, save_file

    require_saelens_venv()
    save_file({"x": x.contiguous()}, str(workdir / "saelens_x.safetensors"))
    script = (f"import torch\nfrom safetensors.torch import load_file, save_file\nfrom sae_lens import SAE\n"
              f"x = load_file({str(workdir / 'saelens_x.safetensors')!r})['x']\n"
              f"sae = SAE.load_from_disk({str(folder)!r})\n"
              f"with torch.no_grad():\n    save_file({{'y': sae(x)}}, {str(workdir / 'saelens_y.safetensors')!r})\n"
              f"print(type(sae).__name__)\n")
    proc = subprocess.run([str(SAELENS_PYTHON), "-c", script], capture_output=True, text=True, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()[-1], load_file(workdir / "saelens_y.safetensors")["y"]
