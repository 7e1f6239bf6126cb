"""Inputs made elsewhere (issue 19): an SAE from SAE_PATH, a naming server, datasets and settings, and
arguments the notebook runner is given. Each ends in exit code 1 with one `error:` line last, and leaves
every earlier artifact as it was (a refused stage 04 leaves the previous concept set current).
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ChatStubHandler, assert_one_line_error, checksums, copy_store, run_python

SECRET = "sk-foreign-0123456789abcdef"
STAGE_04 = ["-m", "saekit.concepts.runner"]
NOTEBOOK_04 = ["-m", "saekit.notebooks", "04_name_sae_concepts.ipynb"]


@pytest.fixture(scope="module")
def concepts_args(tmp_path_factory, smoke_args) -> list[str]:
    """The smoke pipeline's store with a concept set published by stage 04: the set a refusal must keep."""
    args = copy_store(smoke_args, tmp_path_factory.mktemp("concepts") / "store", "concepts*", "notebooks")
    proc = run_python([*STAGE_04, *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return args


@pytest.fixture()
def store(tmp_path, concepts_args) -> tuple[Path, list[str]]:
    store = tmp_path / "store"
    args = copy_store(concepts_args, store)
    assert (store / "concepts_id.txt").is_file()  # the concept set that a refused stage 04 must keep current
    return store, args


def _refused(cmd: list[str], store: Path, *expected: str, env: dict[str, str] | None = None):
    """Run `cmd`; check it ends in one error line saying `expected` and changes nothing in `store`."""
    before = checksums(store)
    proc = run_python(cmd, env)
    assert_one_line_error(proc, *expected)
    assert "without encryption" not in proc.stderr  # ipykernel's warning would follow the error line
    assert checksums(store) == before
    return proc


# --- an SAE from elsewhere (SAE_PATH) -------------------------------------------------------------------

def _foreign_sae(store: Path, folder: Path, cfg=None, weights=None) -> Path:
    """Stage 02's SAELens export, copied to `folder` as a folder from elsewhere (no seal, not marked as
    this project's), with cfg.json and the weights changed by the callables."""
    shutil.copytree(store / "sae_model" / "saelens", folder)
    (folder / "saekit_seal.json").unlink()
    config = json.loads((folder / "cfg.json").read_text())
    del config["metadata"]["written_by"]
    (folder / "cfg.json").write_text(json.dumps(config if cfg is None else cfg(config)))
    if weights is not None:
        tensors = load_file(folder / "sae_weights.safetensors")
        save_file({k: v.contiguous() for k, v in weights(tensors).items()}, folder / "sae_weights.safetensors")
    return folder


def _narrow(d_in: int):
    def change(tensors):
        d_sae = tensors["b_enc"].shape[0]
        g = torch.Generator().manual_seed(0)
        return {**tensors, "W_enc": torch.randn(d_in, d_sae, generator=g),
                "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.zeros(d_in)}
    return change


def _with_nan(tensors):
    W_dec = tensors["W_dec"].clone()
    W_dec[3, 1] = float("nan")
    return {**tensors, "W_dec": W_dec}


def _zero_row(tensors):
    W_dec = tensors["W_dec"].clone()
    W_dec[5] = 0
    return {**tensors, "W_dec": W_dec}


# narrower and wider than the layer's 32 (the two tracebacks the issue found); one notebook run suffices
@pytest.mark.parametrize("runner,d_in", [(STAGE_04, 20), (STAGE_04, 100), (NOTEBOOK_04, 20)])
def test_stage_04_refuses_an_sae_of_another_width(store, tmp_path, runner, d_in):
    store_dir, args = store
    folder = _foreign_sae(store_dir, tmp_path / "foreign", cfg=lambda c: {**c, "d_in": d_in}, weights=_narrow(d_in))
    _refused([*runner, *args, f"--SAE_PATH={folder}"], store_dir, f"the SAE reads {d_in} dimensions but",
             "has 32", "LAYER_SIGNATURE")


@pytest.mark.parametrize("runner", [STAGE_04, ["-m", "saekit.notebooks", "03_analyze_training.ipynb"]])
def test_nan_weights_are_refused_by_stages_03_and_04(store, tmp_path, runner):
    store_dir, args = store
    folder = _foreign_sae(store_dir, tmp_path / "foreign", weights=_with_nan)
    _refused([*runner, *args, f"--SAE_PATH={folder}"], store_dir, "W_dec has 1 non-finite value")


@pytest.mark.parametrize("cfg,says", [
    (lambda c: [c], "holds a JSON list, not an object"),
    (lambda c: None, "holds a JSON NoneType, not an object"),
    (lambda c: {**c, "metadata": "from a colleague"}, "metadata must be a dict, got \"from a colleague\" (str)"),
    (lambda c: {**c, "d_in": "32"}, "d_in must be a int"),
    (lambda c: {**c, "activation_fn_kwargs": [8]}, "activation_fn_kwargs must be a dict"),
    (lambda c: {**c, "d_sae": 10**12}, "says d_sae = 1000000000000 but sae_weights.safetensors has 64"),
    (lambda c: {**c, "d_in": 2304}, "says d_in = 2304 but sae_weights.safetensors has 32"),
])
def test_a_malformed_or_contradicting_cfg_json_is_refused(store, tmp_path, cfg, says):
    store_dir, args = store
    folder = _foreign_sae(store_dir, tmp_path / "foreign", cfg=cfg)
    _refused([*STAGE_04, *args, f"--SAE_PATH={folder}"], store_dir, "cfg.json", says)


def test_a_decoder_row_of_zeros_is_refused(store, tmp_path):
    """Decided: refused. Such a latent writes nothing, and the decoder geometry, the logit lens, steering
    and SAELens's decoder-norm rescaling all need a direction per latent."""
    store_dir, args = store
    folder = _foreign_sae(store_dir, tmp_path / "foreign", weights=_zero_row)
    _refused([*STAGE_04, *args, f"--SAE_PATH={folder}"], store_dir,
             "1 of 64 latents have an all-zero decoder row (first: latent 5)")


# --- settings, datasets and evaluation texts --------------------------------------------------------------

def test_a_seed_torch_cannot_take_is_refused(store):
    store_dir, args = store
    _refused(["02_train_sae.py", *args, f"--SEED={2**64}"], store_dir,
             f"SEED={2**64} must be in [0, {2**64 - 1}]")


def test_a_malformed_jsonl_in_a_dataset_folder_names_the_file_and_line(store, tmp_path):
    store_dir, args = store
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n{"text": "three"}\n')
    _refused(["01_save_activations.py", *args, f"--HF_DATASET={folder}"], store_dir,
             f"{folder / 'train.jsonl'}:2 is not valid JSON")


def _training_file(args: list[str]) -> Path:
    return Path(next(a.split("=", 1)[1] for a in args if a.startswith("--HF_DATASET=")))


@pytest.mark.parametrize("change", ["EVAL_DATASET a copy of the training file", "EVAL_SHARE larger than stage 01's"])
def test_stage_04_refuses_evaluation_texts_that_stage_01_embedded(store, tmp_path, change):
    store_dir, args = store
    if change.startswith("EVAL_DATASET"):
        copy = shutil.copy(_training_file(args), tmp_path / "valid.jsonl")
        extra = [f"--EVAL_DATASET={copy}"]
    else:
        extra = ["--EVAL_SHARE=0.75"]  # stage 01 kept 25% for evaluation and embedded the rest
    _refused([*STAGE_04, *args, *extra], store_dir, "evaluation texts", "were embedded by stage 01",
             "EVAL_DATASET")


@pytest.mark.parametrize("notebook", ["04_name_sae_concepts.ipynb", "05_show_concepts.ipynb"])
def test_stages_04_and_05_stop_in_one_line_after_a_fail_verdict(store, notebook):
    store_dir, args = store
    (store_dir / "analysis.json").write_text(json.dumps(
        {"passed": False, "checks": [{"check": "dead latents (held-out)", "result": "FAIL"}]}))
    _refused(["-m", "saekit.notebooks", notebook, *args, "--CONTINUE_AFTER_FAIL=False"], store_dir,
             "stage 03 judged this SAE a FAIL (dead latents (held-out)", "--CONTINUE_AFTER_FAIL=True")


# --- arguments the notebooks would ignore ------------------------------------------------------------------

@pytest.mark.parametrize("given", [["--TOPK", "16"], ["--TOP_K", "16"]])
def test_the_notebook_runner_refuses_arguments_it_would_ignore(store, given):
    store_dir, args = store
    _refused(["-m", "saekit.notebooks", "05_show_concepts.ipynb", *args, *given], store_dir,
             f"unknown argument(s) ['{given[0][2:]}', '16']")


# --- a naming server -------------------------------------------------------------------------------------

class _Hostile(ChatStubHandler):
    """An OpenAI-compatible server that lists a model, then answers chats as `server.mode` says.
    Every wait is bounded and ends when the test sets `server.stop`."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        mode, stop = self.server.mode, self.server.stop
        if mode == "silent":
            stop.wait(10)
        elif mode == "trickle":  # a valid start, one byte at a time: no read timeout ever fires
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100):
                if stop.wait(0.1):
                    break
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    break
        elif mode == "echo the key":
            self.send_body(401, json.dumps({"error": {"message": f"invalid key: {self.headers['Authorization']}; "
                                                             f"yours ends {SECRET[-12:]}", "type": "auth"}}).encode())
        else:
            choices = [] if mode == "choices []" else None
            self.send_body(200, json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                                        "choices": choices}).encode())


@pytest.fixture
def hostile(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("SAEKIT_TEST_KEY", SECRET)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    httpd.mode, httpd.stop = "choices []", threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.stop.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("mode", ["choices []", "choices null"])
def test_a_reply_without_choices_is_one_line(hostile, mode):
    from saekit.concepts.naming import EndpointNamer, NamingError

    httpd, url = hostile
    httpd.mode = mode
    namer = EndpointNamer(url, "", "SAEKIT_TEST_KEY", 8, timeout=10)
    with pytest.raises(NamingError, match="answered without a message .*Names finished so far are kept"):
        namer.write([[{"role": "user", "content": "name it"}]])


@pytest.mark.parametrize("mode", ["silent", "trickle"])
def test_the_whole_wait_for_one_answer_is_bounded(hostile, mode):
    from saekit.concepts.naming import EndpointNamer, NamingError

    httpd, url = hostile
    httpd.mode = mode
    namer = EndpointNamer(url, "m", "SAEKIT_TEST_KEY", 8, timeout=1.5)
    started = time.monotonic()
    with pytest.raises(NamingError, match=r"no complete answer from .* in 1\.[5-9] s \(NAMING_TIMEOUT_S = 1.5\)"):
        namer.judge([[{"role": "user", "content": "yes or no"}]])
    assert time.monotonic() - started < 4


def test_a_key_the_server_echoes_never_reaches_the_terminal(hostile, store):
    httpd, url = hostile
    httpd.mode = "echo the key"
    store_dir, args = store
    proc = _refused([*STAGE_04, *args, f"--NAMING_MODEL_ID={url}", "--NAMING_API_KEY_ENV=SAEKIT_TEST_KEY",
                     "--N_LATENTS_TO_NAME=1"], store_dir, "the naming endpoint failed", "AuthenticationError",
                    "invalid key: Bearer [key]", env={"SAEKIT_TEST_KEY": SECRET})
    assert SECRET[-8:] not in proc.stdout + proc.stderr


def test_naming_timeout_has_a_range():
    from saekit.base.settings import SettingsError, load_settings

    assert load_settings(["--NAMING_TIMEOUT_S=5"]).NAMING_TIMEOUT_S == 5.0
    for bad in ("0", "-1", "inf"):
        with pytest.raises(SettingsError, match="NAMING_TIMEOUT_S"):
            load_settings([f"--NAMING_TIMEOUT_S={bad}"])


# --- settings too large for the machine ---------------------------------------------------------------

@pytest.mark.parametrize("setting,says", [
    ("--N_LATENTS_MULTIPLIER=10000000", "the SAE, its gradients and Adam's state"),
    ("--BATCH_SIZE_TRAIN=1000000000", "a training step's products"),
])
def test_stage_02_refuses_settings_larger_than_memory_before_allocating(store, setting, says):
    store_dir, args = store
    proc = _refused(["02_train_sae.py", *args, setting], store_dir, "would need about", says, "free", "Lower")
    assert "GB" in proc.stderr.splitlines()[-1]


def test_a_shuffle_buffer_larger_than_memory_is_refused_on_the_fly(tmp_path, smoke_args):
    store = tmp_path / "store"
    args = [*copy_store(smoke_args, store), "--ACTIVATION_SOURCE=model"]
    proc = run_python(["01_save_activations.py", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _refused(["02_train_sae.py", *args, "--SHUFFLE_BUFFER_TOKENS=1000000000000"], store, "the shuffle buffer")


def test_stage_01_refuses_a_forward_batch_larger_than_memory(store):
    store_dir, args = store
    _refused(["01_save_activations.py", *args, "--BATCH_SIZE_SAVE=100000000"], store_dir,
             "stage 01's forward would need", "Lower BATCH_SIZE_SAVE")


@pytest.mark.parametrize("command", [["01_save_activations.py"], ["02_train_sae.py"], ["-m", "saekit.notebooks"]])
@pytest.mark.parametrize("asked", ["--help", "-h"])
def test_help_prints_the_usage_and_how_settings_are_given(command, asked):
    """--help was refused as an unknown argument: it now prints the script's usage and exits 0, touching nothing."""
    proc = run_python([*command, asked])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.lstrip().startswith(("Stage 0", "Run the pipeline's notebooks"))
    assert "--KEY=value" in proc.stdout and "error" not in proc.stdout + proc.stderr
