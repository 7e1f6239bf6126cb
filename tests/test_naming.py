"""Names: scored by detection and fuzzing on windows the namer never saw, the title only where they beat
the label, an OpenAI-compatible endpoint served on 127.0.0.1 by the test, and resuming."""
import json
import shutil
import threading
from http.server import ThreadingHTTPServer

import numpy as np
import pytest

from conftest import ChatStubHandler
from saekit.base.settings import load_settings
from saekit.concepts.collect import scoring_half
from saekit.concepts.exports import apply_names, build_concepts, lead_needed, open_concepts, publish
from saekit.concepts.naming import EndpointNamer, Name, name_latents, naming_task
from saekit.concepts.runner import run_concepts
from saekit.concepts.synthetic import synthetic_codes, synthetic_lens
from saekit.training.sae import TopKSAE

WORDS = ["the", "a", "kite", "bird", "sky", "flew", "wing", "dog", "cat", "ran"] + [f"w{i}" for i in range(60)]
FLYING = {"kite", "bird", "sky", "flew", "wing"}
W = {w: i for i, w in enumerate(WORDS)}
SECRET = "sk-test-0123456789abcdef"  # must reach the server and no file
CONTEXT = 4


def _built(seed=0):
    """Latent 0 fires on five flying words, more than its label may list (max_keys=2): a good name beats
    the label. Latent 1 fires after "the": its label is perfect and no name can beat it."""
    planted = {0: lambda b, w, a: np.isin(w, [W[x] for x in FLYING]), 1: lambda b, w, a: b == W["the"]}
    codes = synthetic_codes(WORDS, 80, 64, 64, 4, planted, seed=seed)
    live = sorted(set(codes.firing[1].tolist()))
    built = build_concepts(codes, synthetic_lens(WORDS, live), {"model_id": "m", "layer_signature": "l", "k": 4},
                           top_n=5, context=CONTEXT, per_quantile=1, non_activating=2, scoring_examples=20, max_keys=2,
                           min_f1=0.3, min_support=1, seed=seed)
    return codes, built


class _Judge(ChatStubHandler):
    """An OpenAI-compatible server that names and judges like a capable model would on these texts."""

    MODEL = "judge-1"

    def _reply(self, body):
        self.send_body(200, json.dumps(body).encode())

    def do_GET(self):
        self.server.seen.append(("GET", self.path, self.headers.get("Authorization"), None))
        super().do_GET()

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = request["messages"][-1]["content"]
        self.server.seen.append(("POST", self.path, self.headers.get("Authorization"), prompt))
        if prompt.startswith("Examples:"):
            marked = prompt.split("The marked words:")[1]
            answer = "flying things" if any(w in marked for w in FLYING) else "words of many kinds"
        else:
            pattern, text = prompt.split("\n")[0], prompt.split("\n")[1]
            if "<<" in text:  # fuzzing: is the marked token one of them?
                hit = text.split("<<")[1].split(">>")[0].strip() in FLYING
            else:  # detection: is one of them in the text?
                hit = bool(FLYING & set(text.removeprefix("Text: ").split()))
            answer = "Yes" if pattern == "Pattern: flying things" and hit else "No"
        self._reply({"id": "c", "object": "chat.completion", "created": 0, "model": request["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": answer}}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("SAEKIT_TEST_KEY", SECRET)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_the_endpoint_namer_names_and_judges_through_a_local_server(server, tmp_path):
    httpd, url = server
    codes, built = _built()
    namer = EndpointNamer(url, "", "SAEKIT_TEST_KEY", 16)
    assert namer.model == "judge-1"  # the first model the server lists
    tasks = {i: naming_task(codes, built.namer_examples[i], built.windows[i], CONTEXT) for i in (0, 1, 2)}
    names = name_latents(namer, tasks, tmp_path / "names.json", progress=False)
    assert names[0] == Name("flying things", 1.0, 1.0)
    assert built.labels[0].window_score() < 1.0  # two keys cannot cover five words
    apply_names(built, names, 0.7)
    assert (built.records[0]["title"], built.records[0]["title_source"]) == ("flying things", "name")
    assert built.labels[1].window_score() == 1.0 and built.records[1]["title"] == "after: the"
    # a name at chance is not the title, even where the label (unexplained) scores lower still
    assert names[2].score == 0.5 and built.records[2]["title_source"] == "label"
    assert {auth for _, _, auth, _ in httpd.seen} == {f"Bearer {SECRET}"}
    # the namer saw only texts of the choosing half; its name was judged on the scoring half
    is_scoring = scoring_half(len(codes.texts), 0)
    for i, task in tasks.items():
        assert not is_scoring[codes.doc[built.namer_examples[i]]].any()
        assert is_scoring[codes.doc[built.windows[i].activating + built.windows[i].silent]].all()
    naming_prompts = [prompt for method, _, _, prompt in httpd.seen if prompt and prompt.startswith("Examples:")]
    assert len(naming_prompts) == 3
    assert not any(w in prompt for prompt in naming_prompts for w in tasks[0].activating)
    publish(tmp_path / "store", built)
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or SECRET not in path.read_text(errors="ignore")


def test_stage_04_names_through_the_endpoint_and_never_stores_the_key(server, smoke_args, tmp_path):
    httpd, url = server
    store = tmp_path / "store"
    shutil.copytree(load_settings(smoke_args).store, store, ignore=shutil.ignore_patterns("notebooks", "concept*"))
    settings = load_settings(smoke_args + [f"--STORE_DIR={store}", f"--NAMING_MODEL_ID={url}",
                                           "--NAMING_API_KEY_ENV=SAEKIT_TEST_KEY", "--N_LATENTS_TO_NAME=3"])
    result = run_concepts(settings, progress=False)
    named = [c for c in result["latents"].values() if c["name"]]
    # the stub's names: which one depends on the examples it is shown (flying words or not)
    assert len(named) == 3 and {c["name"]["text"] for c in named} <= {"flying things", "words of many kinds"}
    assert all(c["title_source"] == "label" for c in named)  # no lead beyond the windows' interval
    assert all(auth == f"Bearer {SECRET}" for _, _, auth, _ in httpd.seen) and len(httpd.seen) > 3
    sae_id = TopKSAE.load(store / "sae_model" / "topk_sae.pt")[1].get("sae_id")
    concepts, _, _ = open_concepts(store, sae_id)
    assert concepts["meta"]["naming_model_id"] == url
    for path in store.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes()


def test_stage_04_goes_on_with_labels_only_when_nothing_answers_at_the_endpoint(smoke_args, tmp_path, capsys):
    import socket
    with socket.socket() as free:  # a port that nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    store = tmp_path / "store"
    shutil.copytree(load_settings(smoke_args).store, store, ignore=shutil.ignore_patterns("notebooks", "concept*"))
    settings = load_settings(smoke_args + [f"--STORE_DIR={store}", f"--NAMING_MODEL_ID=http://127.0.0.1:{port}/v1",
                                           "--N_LATENTS_TO_NAME=2", "--NAMING_TIMEOUT_S=20"])
    result = run_concepts(settings, progress=False)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("naming skipped")]
    assert len(said) == 1 and f"Nothing answers at http://127.0.0.1:{port}/v1" in said[0]
    assert result["meta"]["naming"].startswith("labels only: the naming endpoint")
    assert result["latents"] and not any(c["name"] for c in result["latents"].values())
    assert (store / "concepts_id.txt").is_file()  # published


class _FakeNamer:
    namer_id = "fake"

    def __init__(self, judge=lambda chat: False, fail_after: int | None = None):
        self.judgement, self.fail_after, self.written = judge, fail_after, []

    def write(self, chats):
        if self.fail_after is not None and len(self.written) >= self.fail_after:
            raise KeyboardInterrupt  # as when the user stops the notebook
        self.written += chats
        return ["some name"] * len(chats)

    def judge(self, chats):
        return [self.judgement(chat) for chat in chats]


def test_a_name_that_scores_below_its_label_is_not_the_title(tmp_path):
    codes, built = _built()
    tasks = {i: naming_task(codes, built.namer_examples[i], built.windows[i], CONTEXT) for i in (0, 1)}
    says_yes_to_anything = _FakeNamer(judge=lambda chat: True)
    names = name_latents(says_yes_to_anything, tasks, tmp_path / "names.json", progress=False)
    assert names[0].detection == 0.5 and names[0].fuzzing == 0.5
    apply_names(built, names, 0.7)
    for i in (0, 1):
        assert built.labels[i].window_score() > 0.5
        assert built.records[i]["title"] == built.labels[i].text and built.records[i]["title_source"] == "label"
        assert built.records[i]["name"]["text"] == "some name"  # kept, with its score, for whoever looks


def test_naming_resumes_after_an_interruption(tmp_path):
    codes, built = _built()
    tasks = {i: naming_task(codes, built.namer_examples[i], built.windows[i], CONTEXT) for i in range(5)}
    with pytest.raises(KeyboardInterrupt):
        name_latents(_FakeNamer(fail_after=2), tasks, tmp_path / "names.json", batch_size=2, progress=False)
    assert len(json.loads((tmp_path / "names.json").read_text())["names"]) == 2
    again = _FakeNamer()
    names = name_latents(again, tasks, tmp_path / "names.json", batch_size=2, progress=False)
    assert len(again.written) == 3 and set(names) == set(tasks)  # only the rest were named
    changed = {**tasks, 0: naming_task(codes, built.namer_examples[0][:2], built.windows[0], CONTEXT)}
    third = _FakeNamer()
    name_latents(third, changed, tmp_path / "names.json", progress=False)
    assert len(third.written) == 1  # a latent whose examples changed is named again


def test_a_corrupt_naming_cache_is_set_aside(tmp_path, capsys):
    from saekit.concepts.naming import _read_cache

    cache = tmp_path / "concept_names.json"
    cache.write_text('{"names": {"3": {"text": "cut off')
    assert _read_cache(cache) == {}
    assert "ignoring" in capsys.readouterr().out
    cache.write_text('{"names": {"3": {"text": "dog"}}}')
    assert _read_cache(cache) == {"3": {"text": "dog"}}


def test_a_name_is_the_title_only_when_its_lead_is_beyond_the_windows_interval():
    _, built = _built()
    label_score = built.labels[0].window_score()
    needed = lead_needed(built.windows[0])
    assert 0.1 < needed < 0.25  # 20 activating and silent windows: a lead of a few windows is noise
    for lead, wins in ((needed - 0.01, False), (needed + 0.01, True)):
        score = label_score + lead
        apply_names(built, {0: Name("a name", score, score)}, 0.5)
        assert (built.records[0]["title_source"] == "name") == wins
        assert built.records[0]["name"]["lead_needed"] == pytest.approx(needed, abs=1e-4)
