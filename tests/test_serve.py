"""Naming through a real OpenAI-compatible server: `transformers serve`, started by the test on 127.0.0.1
and serving the embedded SmolLM2-135M (its names are at chance; what is tested is the client-server
path: the model list, streamed answers, a real server's errors, a server killed mid-run and restarted).
Then stub servers that fail the ways servers do: each failure ends naming within NAMING_TIMEOUT_S with
one line saying what to do, and the next run resumes from the cache without asking again.

Every server here listens on 127.0.0.1 only, and every request count is bounded."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ChatStubHandler, assert_one_line_error, copy_store, run_python
from saekit.base.settings import load_settings
from saekit.concepts.exports import build_concepts
from saekit.concepts.naming import EndpointNamer, NamingError, name_latents, naming_task
from saekit.concepts.runner import run_concepts
from saekit.concepts.synthetic import synthetic_codes, synthetic_lens

READY_S = 120  # the longest `transformers serve` may take to start answering /health
NO_KEY = "SAEKIT_TEST_NO_KEY"  # an unset variable: local servers take any key
# urllib without the environment's proxies: the health check goes to 127.0.0.1 and nowhere else
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# The server runs `transformers serve` as the `transformers` command does, and on Linux is sent SIGTERM
# when the test process dies, even killed outright: no server outlives its test.
LAUNCH = """import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[1]):  # the test process died before prctl
    sys.exit(1)
sys.argv = ["transformers", *sys.argv[2:]]
from transformers.commands.transformers_cli import main
main()
"""


@pytest.fixture(autouse=True)
def loopback(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`transformers serve` in a process of its own, on one port of 127.0.0.1 across restarts (the
    naming cache keys on the endpoint's URL, as it does for a user's server)."""

    def __init__(self, folder: Path):
        self.port, self.log, self.hf_home, self.proc = _free_port(), folder / "server.log", folder / "hf", None
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        # offline, with an empty cache: /v1/models would otherwise ask the hub about every model it lists,
        # and a hub model asked for is never found on this machine's disk
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(self.hf_home), "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCH, str(os.getpid()), "serve", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log_level", "warning"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with LOOPBACK.open(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        self.stop()
        pytest.fail(f"transformers serve did not answer /health within {READY_S} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """As a crash would: SIGKILL, no shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def embedded_folder(tmp_path_factory) -> Path:
    """The embedded GGUF model as a plain transformers folder, made as stage 01 caches it in store/models:
    `transformers serve` loads folders and hub ids, not GGUF files."""
    from saekit.activations.models import EMBEDDED_CACHE_NAME, load_model

    cache = tmp_path_factory.mktemp("models")
    model, _ = load_model("embedded", "cpu", cache_dir=cache)
    del model
    return cache / EMBEDDED_CACHE_NAME


@pytest.fixture(scope="module")
def served(tmp_path_factory, embedded_folder):
    server = Served(tmp_path_factory.mktemp("serve"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
    assert server.proc.poll() is not None


WORDS = ["the", "a", "kite", "bird", "sky", "flew", "wing", "dog", "cat", "ran"] + [f"w{i}" for i in range(30)]


def _tasks(n: int, scoring_examples: int = 2) -> dict:
    """Naming tasks for `n` latents of made-up codes, with few scoring windows: a bounded number of requests."""
    codes = synthetic_codes(WORDS, 40, 32, 32, 4, seed=0)
    live = sorted(set(codes.firing[1].tolist()))
    built = build_concepts(codes, synthetic_lens(WORDS, live), {"model_id": "m", "layer_signature": "l", "k": 4},
                           top_n=3, context=3, per_quantile=1, non_activating=1, scoring_examples=scoring_examples,
                           max_keys=2, min_f1=0.3, min_support=1, seed=0)
    chosen = [i for i in live if built.namer_examples[i]][:n]
    return {i: naming_task(codes, built.namer_examples[i], built.windows[i], 3) for i in chosen}


def _requests(task) -> int:
    """The chats one latent costs: its name, then a judgement per scoring window."""
    return 1 + len(task.activating) + len(task.silent) + len(task.marked_peaks) + len(task.marked_decoys)


class Counted:
    """A namer that counts the chats it is given, and can run `before_name[k]` before the k-th name."""

    def __init__(self, namer, before_name=None):
        self.namer, self.namer_id, self.batch_size = namer, namer.namer_id, namer.batch_size
        self.before_name, self.names, self.judged = before_name or {}, 0, 0

    def write(self, chats):
        for _ in chats:
            self.before_name.get(self.names, lambda: None)()
            self.names += 1
        return self.namer.write(chats)

    def judge(self, chats):
        self.judged += len(chats)
        return self.namer.judge(chats)


def _is_one_line(message: str) -> bool:
    return "\n" not in message and "Traceback" not in message


# --- transformers serve -----------------------------------------------------------------------------------

def test_transformers_serve_lists_models_and_names_through_its_stream(served, embedded_folder):
    # the list: transformers serve lists a fixed set of hub models, whatever it runs
    listing = EndpointNamer(served.url, "", NO_KEY, 8, timeout=60)
    assert "/" in listing.model
    # ... so the first of them cannot be loaded offline: an HTTP 500, after the client's retries, in one line
    started = time.monotonic()
    with pytest.raises(NamingError) as refused:
        listing.write([[{"role": "user", "content": "Name a colour."}]])
    assert time.monotonic() - started < 30
    message = str(refused.value)
    assert _is_one_line(message) and "InternalServerError" in message and listing.model in message
    assert "NAMING_API_MODEL" in message and "Names finished so far are kept" in message

    chats = [[{"role": "user", "content": f"Pattern: animals\nText: {text}\nDoes the text contain the pattern? "
                                          "Answer Yes or No."}] for text in ("The dog ran.", "The sky is blue.")]
    # asked for whole answers, the server streams anyway: the namer reads the stream from then on
    auto = EndpointNamer(served.url, str(embedded_folder), NO_KEY, 8, timeout=60)
    assert auto.stream is None
    name = auto.write([[{"role": "user", "content": "Examples:\n- the <<dog>> ran\nThe marked words: dog.\n"
                                                    "Describe what the marked words have in common in a few "
                                                    "words. Answer with the description only."}]])[0]
    assert auto.stream is True and name.strip() and name != "(no name)"
    votes = auto.judge(chats)
    assert all(isinstance(v, bool) for v in votes)
    # streamed from the start: the same greedy answers
    assert EndpointNamer(served.url, str(embedded_folder), NO_KEY, 8, timeout=60, stream=True).judge(chats) == votes
    # whole answers only: this server cannot give one, and the line says what it sent
    with pytest.raises(NamingError, match="answered with text, not a chat completion .'data: "):
        EndpointNamer(served.url, str(embedded_folder), NO_KEY, 8, timeout=60, stream=False).judge(chats[:1])


def test_stage_04_names_through_transformers_serve(served, embedded_folder, smoke_args, tmp_path):
    store = tmp_path / "store"
    args = copy_store(smoke_args, store, "notebooks", "concept*")
    settings = load_settings(args + [f"--NAMING_MODEL_ID={served.url}", f"--NAMING_API_MODEL={embedded_folder}",
                                     f"--NAMING_API_KEY_ENV={NO_KEY}", "--N_LATENTS_TO_NAME=2",
                                     "--SCORING_EXAMPLES=1"])
    result = run_concepts(settings, progress=False)
    named = [c for c in result["latents"].values() if c["name"]]
    assert len(named) == 2
    for concept in named:
        assert concept["name"]["text"].strip()
        assert concept["title_source"] in ("label", "name")
    cached = json.loads((store / "concept_names.json").read_text())["names"]
    assert len(cached) == 2 and result["meta"]["naming_model_id"] == served.url


def test_a_server_killed_mid_run_then_restarted_resumes_from_the_cache(served, embedded_folder, tmp_path):
    tasks = _tasks(3, scoring_examples=1)
    cache = tmp_path / "concept_names.json"
    namer = EndpointNamer(served.url, str(embedded_folder), NO_KEY, 8, timeout=60)
    first = Counted(namer, before_name={2: served.kill})  # the server dies before the third latent's name
    started = time.monotonic()
    with pytest.raises(NamingError) as stopped:
        name_latents(first, tasks, cache, progress=False)
    assert time.monotonic() - started < 60
    message = str(stopped.value)
    assert _is_one_line(message) and f"Nothing answers at {served.url}" in message
    assert "rerun stage 04 to go on" in message
    kept = json.loads(cache.read_text())["names"]
    done = list(tasks)[:2]
    assert sorted(kept) == sorted(str(i) for i in done)  # each latent was saved as soon as it was scored

    served.start()  # the same port, so the same endpoint
    again = Counted(EndpointNamer(served.url, str(embedded_folder), NO_KEY, 8, timeout=60))
    names = name_latents(again, tasks, cache, progress=False)
    rest = [tasks[i] for i in list(tasks)[2:]]
    # no chat asked twice (the server sees one request more: the first chat, asked whole, then streamed)
    assert again.names == 1 and again.names + again.judged == sum(map(_requests, rest))
    assert set(names) == set(tasks)
    assert all(json.loads(cache.read_text())["names"][k] == v for k, v in kept.items())


# --- servers that fail --------------------------------------------------------------------------------------

def _completion(text: str) -> dict:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}


def _chunk(delta: dict, finish=None) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n".encode()


class _Failing(ChatStubHandler):
    """An OpenAI-compatible server that answers as a healthy one until the `server.fail_at`-th name is asked
    for (None: never), then in `server.failure`'s way. Names are "name 1", "name 2", ...; judgements "Yes"."""

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = request["messages"][-1]["content"]
        server = self.server
        with server.lock:
            if prompt.startswith("Examples:"):
                server.names.append(prompt)
            failing = server.fail_at is not None and len(server.names) >= server.fail_at
            server.posts += 1
        mode = server.failure if failing else ("stream" if request.get("stream") else "ok")
        answer = f"name {len(server.names)}" if prompt.startswith("Examples:") else "Yes"
        if mode == "ok":
            self.send_body(200, json.dumps(_completion(answer)).encode())
        elif mode == "stream":
            self.send_body(200, _chunk({"role": "assistant"}) + _chunk({"content": answer}) + _chunk({}, "stop")
                       + b"data: [DONE]\n\n", "text/event-stream")
        elif mode == "slow":
            server.stop.wait(1.0)
            self.send_body(200, json.dumps(_completion(answer)).encode())
        elif mode.startswith("http "):
            status = int(mode.split()[1])
            self.send_body(status, json.dumps({"error": {"message": f"server error {status}", "type": "x"}}).encode())
        elif mode == "garbage json":
            self.send_body(200, b'{"choices": [{"message": {"content": "Ye')
        elif mode == "html":
            self.send_body(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
        elif mode == "stream garbage":
            self.send_body(200, b"data: {not json\n\n", "text/event-stream")
        elif mode == "stream error":  # an error event, as a server may send mid-answer
            self.send_body(200, _chunk({"role": "assistant"}) + b'data: {"error": "CUDA out of memory"}\n\n',
                       "text/event-stream")
        elif mode == "cut-off stream":  # transformers serve 4.57 failing mid-answer: no blank line ends its error
            self.send_body(200, _chunk({"role": "assistant"}) + _chunk({"content": "Ye"})
                       + b'data: {"error": "CUDA out of memory"}', "text/event-stream")
        elif mode == "empty stream":
            self.send_body(200, b"", "text/event-stream")
        else:
            raise AssertionError(mode)


@pytest.fixture
def failing():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    httpd.fail_at, httpd.failure, httpd.names, httpd.posts = None, "", [], 0
    httpd.lock, httpd.stop = threading.Lock(), threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.stop.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("stream", [None, True])
def test_a_healthy_server_is_read_whole_or_streamed(failing, stream):
    httpd, url = failing
    namer = EndpointNamer(url, "", NO_KEY, 8, timeout=10, stream=stream)
    assert namer.write([[{"role": "user", "content": "Examples: ..."}]]) == ["name 1"]
    assert namer.judge([[{"role": "user", "content": "Pattern: x"}]] * 2) == [True, True]
    assert namer.stream is stream and httpd.posts == 3  # a server that answers whole is never asked to stream


@pytest.mark.parametrize("failure,stream,says", [
    ("http 500", None, "InternalServerError: Error code: 500"),
    ("http 503", None, "InternalServerError: Error code: 503"),
    ("http 404", None, "NotFoundError: Error code: 404"),
    ("garbage json", None, "JSONDecodeError"),
    ("html", None, "answered with text, not a chat completion ('<html>"),
    ("stream garbage", True, "JSONDecodeError"),
    ("stream error", True, "An error occurred during streaming: CUDA out of memory"),
    ("empty stream", True, "answered a streamed request with no chunk"),
    ("cut-off stream", True, "cut its streamed answer off ('Ye' and no finish_reason): the server failed"),
])
def test_a_failing_server_ends_naming_in_one_line(failing, failure, stream, says):
    httpd, url = failing
    httpd.fail_at, httpd.failure = 0, failure
    namer = EndpointNamer(url, "m", NO_KEY, 8, timeout=10, stream=stream)
    started = time.monotonic()
    with pytest.raises(NamingError) as failed:
        namer.write([[{"role": "user", "content": "Examples: ..."}]])
    assert time.monotonic() - started < 10
    message = str(failed.value)
    assert says in message and _is_one_line(message) and "rerun stage 04 to go on" in message
    assert httpd.posts <= 3  # the client retries an HTTP error twice, nothing else


def test_a_slow_server_is_waited_for_up_to_the_timeout(failing):
    httpd, url = failing
    httpd.fail_at, httpd.failure = 0, "slow"  # 1 s a request
    assert EndpointNamer(url, "m", NO_KEY, 8, timeout=5).write([[{"role": "user", "content": "Examples:"}]]) \
        == ["name 1"]
    with pytest.raises(NamingError, match=r"no complete answer from .* in 0\.[4-9] s \(NAMING_TIMEOUT_S = 0.4\)"):
        EndpointNamer(url, "m", NO_KEY, 8, timeout=0.4).write([[{"role": "user", "content": "Examples:"}]])


def test_a_server_that_accepts_and_never_answers_is_given_up_on():
    with socket.socket() as listener:  # the kernel accepts the connection; nothing ever reads or answers it
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        started = time.monotonic()
        with pytest.raises(NamingError) as listing:
            EndpointNamer(url, "", NO_KEY, 8, timeout=1.5)
        assert "cannot list the models" in str(listing.value) and "NAMING_TIMEOUT_S = 1.5" in str(listing.value)
        with pytest.raises(NamingError, match=r"no complete answer .* in 1\.[5-9] s .*rerun stage 04 to go on"):
            EndpointNamer(url, "m", NO_KEY, 8, timeout=1.5).judge([[{"role": "user", "content": "x"}]])
        assert time.monotonic() - started < 8


def test_nothing_listening_is_one_line_naming_the_url():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(NamingError) as failed:
        EndpointNamer(url, "m", NO_KEY, 8, timeout=10).write([[{"role": "user", "content": "Examples:"}]])
    assert _is_one_line(str(failed.value)) and f"Nothing answers at {url}: start the server" in str(failed.value)


def test_naming_resumes_after_a_failing_server_without_asking_again(failing, tmp_path):
    httpd, url = failing
    tasks = _tasks(4)
    cache = tmp_path / "concept_names.json"
    httpd.fail_at, httpd.failure = 3, "garbage json"  # the third name is never answered
    with pytest.raises(NamingError):
        name_latents(EndpointNamer(url, "m", NO_KEY, 8, timeout=10), tasks, cache, progress=False)
    assert len(json.loads(cache.read_text())["names"]) == 2
    answered, httpd.fail_at, httpd.names, httpd.posts = httpd.names[:2], None, [], 0
    names = name_latents(EndpointNamer(url, "m", NO_KEY, 8, timeout=10), tasks, cache, progress=False)
    assert set(names) == set(tasks) and not set(answered) & set(httpd.names)
    assert len(httpd.names) == 2 and httpd.posts == sum(_requests(tasks[i]) for i in list(tasks)[2:])


def test_stage_04_stops_in_one_line_on_a_failing_server_then_resumes(failing, smoke_args, tmp_path):
    httpd, url = failing
    store = tmp_path / "store"
    args = copy_store(smoke_args, store, "notebooks", "concept*") + [
        f"--NAMING_MODEL_ID={url}", f"--NAMING_API_KEY_ENV={NO_KEY}", "--N_LATENTS_TO_NAME=3", "--SCORING_EXAMPLES=2",
        "--NAMING_TIMEOUT_S=10"]
    httpd.fail_at, httpd.failure = 2, "html"
    proc = run_python(["-m", "saekit.concepts.runner", *args], env={"NO_PROXY": "127.0.0.1,localhost"})
    assert_one_line_error(proc, "answered with text, not a chat completion", "rerun stage 04 to go on")
    assert not (store / "concepts_id.txt").exists()  # nothing published
    kept = json.loads((store / "concept_names.json").read_text())["names"]
    assert len(kept) == 1
    answered, httpd.fail_at, httpd.names = httpd.names[:1], None, []
    result = run_concepts(load_settings(args), progress=False)
    assert sum(1 for c in result["latents"].values() if c["name"]) == 3
    assert len(httpd.names) == 2 and not set(answered) & set(httpd.names)  # only the two not yet named
    names = json.loads((store / "concept_names.json").read_text())["names"]
    assert all(names[k] == v for k, v in kept.items())
