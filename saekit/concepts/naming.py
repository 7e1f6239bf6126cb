"""Stage 04, names: a one-line name per latent written by a language model, scored the way delphi
scores explanations, and made the latent's title only where it beats the latent's label.

NAMING_MODEL_ID picks the namer:

    "none"                  no names. The default: the embedded 135M model names at chance
                            (observations.md), so its names would only hide the labels.
    "http(s)://host:port/v1" an OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp's server, a hosted
                            API) through the openai client. NAMING_API_MODEL is the model to ask for
                            ("" = the first the server lists); the key is read from the environment
                            variable that NAMING_API_KEY_ENV names, and is never written anywhere.
    anything else           a local folder or hub id run through transformers ("embedded" included).

The namer sees the latent's top examples from the choosing half only, its peak token marked
<<like this>>. The name is then scored on windows of the scoring half that the namer never saw, with
the same model as the judge: detection (does the name pick the activating windows out from silent
ones?) and fuzzing (does it accept the marked peak and reject a marked token where the latent is
silent?), each a balanced accuracy. The label's rule is scored on the very same windows
(saekit.concepts.labels.window_scores), so the two are compared like for like.

Naming resumes after an interruption: each finished latent is cached under a checksum of everything
that went into it (namer, prompts, windows), so a rerun asks only about the rest.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..base.atomic import write_json
from ..base.errors import PipelineError
from .collect import HeldoutCodes, ScoringWindows, window
from .labels import balanced_accuracy

PROMPT_VERSION = 4
NO_NAMER = "none"
Chat = list[dict[str, str]]


class NamingError(PipelineError):
    """A naming endpoint that cannot be reached or answers nonsense."""


class EndpointUnreachableError(NamingError):
    """Nothing answers at the naming endpoint's address: stage 04 goes on with labels only."""


# --- what the namer and the judge read ------------------------------------------------------------

def window_text(codes: HeldoutCodes, centre: int, context: int, marked: int | None = None) -> str:
    """The window around `centre` as text, on one line, with the token `marked` shown as <<token>>."""
    start, stop = window(codes, centre, context)
    keep = codes.countable[start:stop]
    pieces = [f"<<{text}>>" if start + j == marked else text
              for j, text in enumerate(codes.token_strings(np.arange(start, stop))) if keep[j]]
    return "".join(pieces).replace("\n", " ").strip()


def naming_chat(examples: list[str], peak_tokens: list[str]) -> Chat:
    """The chat that asks for a latent's name from its marked examples and its peak tokens."""
    contexts = "\n".join(f"- {e}" for e in examples)
    words = ", ".join(dict.fromkeys(t.strip() or repr(t) for t in peak_tokens))
    return [{"role": "user", "content": f"Examples:\n{contexts}\nThe marked words: {words}.\n"
                                        "Describe what the marked words have in common in a few words. "
                                        "Answer with the description only."}]


def detection_chat(name: str, text: str) -> Chat:
    return [{"role": "user", "content": f"Pattern: {name}\nText: {text}\n"
                                        "Does the text contain the pattern? Answer Yes or No."}]


def fuzzing_chat(name: str, marked_text: str) -> Chat:
    return [{"role": "user", "content": f"Pattern: {name}\nText: {marked_text}\n"
                                        "Is the token marked <<like this>> an instance of the pattern? "
                                        "Answer Yes or No."}]


@dataclass
class NamingTask:
    """Everything about one latent that its name and the name's score depend on."""

    chat: Chat  # the request for the name
    activating: list[str]  # windows for detection
    silent: list[str]
    marked_peaks: list[str]  # windows for fuzzing
    marked_decoys: list[str]

    def checksum(self, namer_id: str) -> str:
        blob = json.dumps({"namer": namer_id, "version": PROMPT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def naming_task(codes: HeldoutCodes, examples: list[int], windows: ScoringWindows, context: int) -> NamingTask:
    """The task for a latent from its top peak tokens of the choosing half and its scoring windows."""
    marked = [(peak, decoy) for peak, decoy in zip(windows.activating, windows.decoys) if decoy is not None]
    return NamingTask(
        chat=naming_chat([window_text(codes, t, context, marked=t) for t in examples],
                         codes.token_strings(np.array(examples, np.int64))),
        activating=[window_text(codes, t, context) for t in windows.activating],
        silent=[window_text(codes, t, context) for t in windows.silent],
        marked_peaks=[window_text(codes, peak, context, marked=peak) for peak, _ in marked],
        marked_decoys=[window_text(codes, peak, context, marked=decoy) for peak, decoy in marked])


# --- namers ------------------------------------------------------------------------------------

class Namer(Protocol):
    namer_id: str  # what the cache keys on: model and generation settings, never a key

    def write(self, chats: list[Chat]) -> list[str]:
        """One short answer per chat."""

    def judge(self, chats: list[Chat]) -> list[bool]:
        """Yes (True) or No per chat."""


def clean_name(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.strip(" \"'.*:")[:80] or "(no name)"


class TransformersNamer:
    """A causal LM run locally: greedy names, and Yes/No read from the next-token logits."""

    # SmolLM2-135M copies any example it is shown as a "name", so the answer is begun for it.
    ANSWER_PREFIX = "They are"

    def __init__(self, model, tokenizer, model_id: str, max_new_tokens: int, batch_size: int = 8):
        self.model, self.tokenizer, self.max_new_tokens, self.batch_size = model, tokenizer, max_new_tokens, batch_size
        self.namer_id = f"transformers:{model_id}/{max_new_tokens}"
        self.yes, self.no = (tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No"))

    def _prompts(self, chats: list[Chat], prefix: str = "") -> list[str]:
        return [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) + prefix
                for c in chats]

    def _batches(self, prompts: list[str]):
        self.tokenizer.padding_side = "left"  # every row's answer starts at its right edge
        try:
            for lo in range(0, len(prompts), self.batch_size):
                yield self.tokenizer(prompts[lo:lo + self.batch_size], return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(next(self.model.parameters()).device)
        finally:
            self.tokenizer.padding_side = "right"

    @torch.no_grad()
    def write(self, chats: list[Chat]) -> list[str]:
        names = []
        for enc in self._batches(self._prompts(chats, self.ANSWER_PREFIX)):
            out = self.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id)
            names += [clean_name(t) for t in self.tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:],
                                                                          skip_special_tokens=True)]
        return names

    @torch.no_grad()
    def judge(self, chats: list[Chat]) -> list[bool]:
        votes = []
        for enc in self._batches(self._prompts(chats)):
            logits = self.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, -1]
            votes += (logits[:, self.yes] > logits[:, self.no]).tolist()
        return votes


class EndpointNamer:
    """An OpenAI-compatible chat endpoint, asked one chat at a time at temperature 0.

    Each request, its retries and its answer together take at most `timeout` seconds: the client's
    own timeout restarts with every byte, so a server that trickles its answer would hold the stage
    forever. Every message about the endpoint has the key removed, whatever the server echoes.

    `stream`: None asks for whole answers and, when the server streams anyway (`transformers serve`
    answers every chat as an event stream, whatever it is asked), streams for the rest of the run;
    True or False asks only one way."""

    batch_size = 1  # chats go one at a time anyway; name_latents saves each latent as soon as it is scored
    KEPT = "Names finished so far are kept; rerun stage 04 to go on."

    def __init__(self, base_url: str, model: str, api_key_env: str, max_new_tokens: int, timeout: float = 60,
                 stream: bool | None = None):
        from openai import OpenAI

        self.base_url, self.timeout, self.stream = base_url, timeout, stream
        self.secret = os.environ.get(api_key_env) or ""
        # local servers (vLLM, Ollama, llama.cpp) accept any key; the client insists on one
        self.client = OpenAI(base_url=base_url, api_key=self.secret or "not-needed", timeout=timeout, max_retries=2)
        self.max_new_tokens = max_new_tokens
        self.model = model or self._first_model()
        self.namer_id = f"endpoint:{base_url}#{self.model}/{max_new_tokens}"

    def _call(self, request: Callable[[], Any], failed: str, advice: str) -> Any:
        """request(), bounded by the timeout as a whole; any failure is a NamingError that says `failed`."""
        from openai import APIConnectionError, APIStatusError, APITimeoutError

        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["value"] = request()
            except Exception as err:  # the client raises many kinds; all mean the same to the user
                outcome["error"] = err

        started = time.monotonic()
        # a daemon thread: one stuck on a silent server must not keep the process alive after the error
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise NamingError(self._redact(
                f"{failed}: no complete answer from {self.base_url} in {time.monotonic() - started:.1f} s "
                f"(NAMING_TIMEOUT_S = {self.timeout:g}). Check the server, or raise NAMING_TIMEOUT_S. {advice}"))
        if "error" in outcome:
            err = outcome["error"]
            if isinstance(err, NamingError):  # an answer read and found wanting: its message says so
                raise NamingError(self._redact(str(err))) from None
            status = getattr(err, "status_code", None) if isinstance(err, APIStatusError) else None
            if isinstance(err, APIConnectionError) and not isinstance(err, APITimeoutError):
                hint = f" Nothing answers at {self.base_url}: start the server, or correct NAMING_MODEL_ID."
            elif status in (404, 422) or status is not None and status >= 500:
                hint = (" The server's log says why; a server that cannot find or load the model asked for needs "
                        "NAMING_API_MODEL set to one it serves.")
            else:
                hint = ""
            unreachable = isinstance(err, APIConnectionError) and not isinstance(err, APITimeoutError)
            error = EndpointUnreachableError if unreachable else NamingError
            raise error(self._redact(f"{failed} ({describe_error(err)}).{hint} {advice}")) from None
        return outcome["value"]

    def _redact(self, message: str) -> str:
        return redact(message, self.secret)

    def _first_model(self) -> str:
        listed = self._call(lambda: [m.id for m in self.client.models.list()],
                            f"cannot list the models of the naming endpoint {self.base_url}",
                            "Check that the server runs, or set NAMING_API_MODEL.")
        if not listed:
            raise NamingError(f"the naming endpoint {self.base_url} lists no model. Set NAMING_API_MODEL.")
        return listed[0]

    def _not_a_chat(self, what: str) -> NamingError:
        return NamingError(self._redact(
            f"the naming endpoint {self.base_url} answered {what}; it is not an OpenAI-compatible chat endpoint, "
            f"or it failed. {self.KEPT}"))

    def _create(self, chat: Chat, max_tokens: int, stream: bool) -> Any:
        return self.client.chat.completions.create(model=self.model, messages=chat, max_tokens=max_tokens,
                                                   temperature=0, stream=stream)

    def _streamed(self, chat: Chat, max_tokens: int) -> str:
        """The answer's pieces, read to the stream's end (within _call, so the whole stream is bounded).

        A stream that ends before a chunk says why the answer finished (finish_reason) was cut off: a
        server that fails mid-answer may say so in a line the client never reads (transformers serve
        4.57 ends its stream with `data: {"error": ...}` and no blank line after it)."""
        parts, chunks, finished = [], 0, False
        stream = self._create(chat, max_tokens, stream=True)
        try:
            for chunk in stream:
                chunks += 1
                choices = getattr(chunk, "choices", None)
                if not choices:  # a chunk of usage figures has none
                    continue
                delta = getattr(choices[0], "delta", None) if isinstance(choices, list) else None
                content = getattr(delta, "content", None)
                if delta is None or not isinstance(content, (str, type(None))):
                    raise self._not_a_chat(f"a streamed chunk without a delta ({str(chunk)[:100]})")
                parts.append(content or "")
                finished = finished or bool(getattr(choices[0], "finish_reason", None))
        finally:
            stream.close()
        if not chunks:
            raise self._not_a_chat("a streamed request with no chunk")
        if not finished:
            raise NamingError(self._redact(
                f"the naming endpoint {self.base_url} cut its streamed answer off ({''.join(parts)[:60]!r} and no "
                f"finish_reason): the server failed mid-answer, and its log says why. {self.KEPT}"))
        return "".join(parts)

    def _ask(self, chat: Chat, max_tokens: int) -> str:
        failed = f"the naming endpoint failed at {self.base_url}, asked for model {self.model!r}"
        if self.stream:
            return self._call(lambda: self._streamed(chat, max_tokens), failed, self.KEPT)
        reply = self._call(lambda: self._create(chat, max_tokens, stream=False), failed, self.KEPT)
        if isinstance(reply, str):  # the body was not JSON: the client hands it back as text
            if self.stream is None and reply.lstrip().startswith("data:"):
                self.stream = True  # an event stream where a whole answer was asked: stream from now on
                return self._ask(chat, max_tokens)
            raise self._not_a_chat(f"with text, not a chat completion ({reply[:100]!r})")
        choices = getattr(reply, "choices", None)
        message = getattr(choices[0], "message", None) if isinstance(choices, list) and choices else None
        content = getattr(message, "content", None)
        if message is None or not isinstance(content, (str, type(None))):
            raise self._not_a_chat(f"without a message (choices: {str(choices)[:100]})")
        return content or ""

    def write(self, chats: list[Chat]) -> list[str]:
        return [clean_name(self._ask(chat, self.max_new_tokens)) for chat in chats]

    def judge(self, chats: list[Chat]) -> list[bool]:
        return [self._ask(chat, 2).strip().lower().startswith("yes") for chat in chats]


def describe_error(err: Exception) -> str:
    """The error's kind and message, with the body a server sent where the message leaves it out
    (the openai client reports a streamed {"error": "..."} as "An error occurred during streaming")."""
    text = str(err)
    body = getattr(err, "body", None)
    if isinstance(body, str) and body and body not in text:
        text = f"{text}: {body}"
    # a server's error body may be long; the line keeps its start, which says what went wrong
    return f"{type(err).__name__}: {text[:400]}"


def redact(message: str, secret: str, shortest: int = 6) -> str:
    """`message` without `secret`, nor any piece of it `shortest` characters or longer: servers echo
    keys whole, cut (sk-abc...xyz) or quoted, and any of these would end up on the terminal."""
    if not secret:
        return message
    if len(secret) <= shortest:
        return message.replace(secret, "[key]")
    # the longest pieces first, so a whole key leaves one marker rather than several
    for size in range(len(secret), shortest - 1, -1):
        for start in range(len(secret) - size + 1):
            message = message.replace(secret[start:start + size], "[key]")
    return message


def is_endpoint(naming_model_id: str) -> bool:
    return naming_model_id.startswith(("http://", "https://"))


# --- naming and scoring --------------------------------------------------------------------------

@dataclass
class Name:
    text: str
    detection: float | None
    fuzzing: float | None

    @property
    def score(self) -> float | None:
        """Mean of detection and fuzzing, as for labels."""
        parts = [s for s in (self.detection, self.fuzzing) if s is not None]
        return float(np.mean(parts)) if parts else None


def score_name(namer: Namer, name: str, task: NamingTask) -> Name:
    """Detection and fuzzing of `name`, judged by the namer on the task's held-out windows."""
    groups = [task.activating, task.silent, task.marked_peaks, task.marked_decoys]
    chats = ([detection_chat(name, w) for w in task.activating + task.silent]
             + [fuzzing_chat(name, w) for w in task.marked_peaks + task.marked_decoys])
    votes = namer.judge(chats)
    cuts = np.cumsum([0] + [len(g) for g in groups])
    answers = [votes[cuts[i]:cuts[i + 1]] for i in range(4)]
    return Name(name, balanced_accuracy(answers[0], answers[1]), balanced_accuracy(answers[2], answers[3]))


def _read_cache(cache_path: Path) -> dict[str, Any]:
    """The names finished by an earlier run; a cache that is not valid JSON is set aside, not used."""
    if not cache_path.exists():
        return {}
    try:
        names = json.loads(cache_path.read_text()).get("names", {})
    except (ValueError, UnicodeDecodeError, AttributeError):
        print(f"ignoring {cache_path}: it is corrupt; every latent is named again")
        return {}
    return names if isinstance(names, dict) else {}


def name_latents(namer: Namer, tasks: dict[int, NamingTask], cache_path: Path, batch_size: int | None = None,
                 progress: bool = True) -> dict[int, Name]:
    """Name and score each latent of `tasks`; finished latents are saved to `cache_path` after every
    batch, so a rerun names only the rest. A batch is `batch_size` latents, by default the namer's own
    (8 for a local model, which writes a batch of names at once; 1 for an endpoint, so a failure costs
    at most the latent in hand)."""
    batch_size = batch_size or getattr(namer, "batch_size", 8)
    done = _read_cache(cache_path)
    checksums = {i: task.checksum(namer.namer_id) for i, task in tasks.items()}
    todo = [i for i in tasks if done.get(str(i), {}).get("checksum") != checksums[i]]
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="naming latents", disable=not progress)
    for lo in range(0, len(todo), batch_size):
        batch = todo[lo:lo + batch_size]
        for i, text in zip(batch, namer.write([tasks[i].chat for i in batch])):
            done[str(i)] = {"checksum": checksums[i], **asdict(score_name(namer, text, tasks[i]))}
        write_json(cache_path, {"names": done})
        bar.update(len(batch))
    bar.close()
    return {i: Name(done[str(i)]["text"], done[str(i)]["detection"], done[str(i)]["fuzzing"]) for i in tasks}
