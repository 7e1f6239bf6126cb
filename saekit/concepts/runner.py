"""Stage 04 from the settings: collect the codes, label every live latent, name where a namer is set,
and publish the exports. Each step is its own module:

    saekit.concepts.collect   the SAE's codes on every held-out token, and examples drawn from them
    saekit.concepts.labels    token-level labels, chosen on one half of the texts and scored on the other
    saekit.concepts.naming    names written by a model, scored by detection and fuzzing
    saekit.concepts.exports   the records, published as one set of files
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..activations.data import Texts, load_role_texts
from ..activations.models import detect_device, layer_names, load_model, resolve_layer
from ..activations.stage import load_stage_model, stage_runtime, start_stage
from ..activations.store import RUN_ID_FILE, open_run
from ..base.distributed import World, leave_world
from ..base.errors import PipelineError
from ..base.integrity import read_sealed_json
from ..training.sae import check_sae_matches
from ..training.saelens_format import load_sae
from ..training.sweep import chosen_name, history_path
from .collect import collect, latent_stats, scoring_half
from .exports import apply_names, build_concepts, publish
from .naming import NO_NAMER, EndpointNamer, EndpointUnreachableError, Namer, TransformersNamer, is_endpoint, name_latents, naming_task
from .output_side import output_sides

NO_NAMES_NOTE = ("No names: NAMING_MODEL_ID is 'none'. The embedded 135M model names at chance (its names scored "
                 "0.50 by detection and by fuzzing, observations.md), so titles are the labels. To name latents, set "
                 "NAMING_MODEL_ID to a capable instruct model: a local folder or hub id, or an OpenAI-compatible "
                 "endpoint such as http://localhost:8000/v1 (vLLM, Ollama, llama.cpp's server), with NAMING_API_MODEL "
                 "and the key in the variable NAMING_API_KEY_ENV names.")


def open_namer(settings, device, model, tokenizer) -> Namer | None:
    """The namer that NAMING_MODEL_ID asks for; `model` is reused when it is the same model."""
    naming_id = settings.NAMING_MODEL_ID
    if naming_id == NO_NAMER or settings.N_LATENTS_TO_NAME < 0:
        return None
    if is_endpoint(naming_id):
        return EndpointNamer(naming_id, settings.NAMING_API_MODEL, settings.NAMING_API_KEY_ENV,
                             settings.NAMING_MAX_NEW_TOKENS, settings.NAMING_TIMEOUT_S)
    if naming_id != settings.MODEL_ID:
        model, tokenizer = load_model(naming_id, device, cache_dir=settings.store / "models")
    return TransformersNamer(model, tokenizer, naming_id, settings.NAMING_MAX_NEW_TOKENS)


def read_parts(texts: list[str], tokenizer, max_length: int) -> list[str]:
    """Each text cut where the model stops reading it (MAX_LENGTH tokens): the exports carry no more of a
    text than was analysed, so one long text cannot swell them (a 5 MB text once made a 177 MB
    top_texts.json). A text the model reads whole is kept as it is."""
    limit = max(1, max_length - tokenizer.num_special_tokens_to_add())  # BOS and the like take their places
    if not texts:
        return []
    if tokenizer.is_fast:
        offsets = tokenizer(texts, truncation=True, max_length=limit, return_offsets_mapping=True,
                            add_special_tokens=False)["offset_mapping"]
        return [text[:spans[-1][1]] if len(spans) == limit else text for text, spans in zip(texts, offsets)]
    ids = tokenizer(texts, truncation=True, max_length=limit, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(read, clean_up_tokenization_spaces=False) if len(read) == limit else text
            for text, read in zip(texts, ids)]  # no offsets: the tokens read, decoded


def training_deadness(store: Path, sae_id: str | None, name: str | None = None) -> dict[str, Any] | None:
    """The latents that never fired on stage 02's last held-out check, and on how many tokens: with
    stage 04's texts, a latent is dead only where it is silent on both (the demo: 12,556 held-out rows
    and 24,707 tokens), so one that fires on the held-out rows alone is not called dead. None for an
    SAE that stage 02 did not train here (SAE_PATH), or a history that is not this SAE's: then stage
    04's own texts decide."""
    path = history_path(store, name)  # with SWEEP, the analysed SAE's own
    if sae_id is None or not path.exists():
        return None
    history = read_sealed_json(path, "Run stage 02 again (02_train_sae.py).")
    if history.get("sae_id") != sae_id or "latent_frequency" not in history or not history.get("history"):
        return None
    tokens = int(history["history"][-1]["heldout_n_tokens"])
    return {"indexes": [i for i, f in enumerate(history["latent_frequency"]) if f == 0], "tokens": tokens,
            "decided_on": f"{tokens} held-out activation rows of run {history.get('activation_run_id')} "
                          "(stage 02's last check)"}


class EvalOverlapError(PipelineError):
    """Stage 04's texts include some that stage 01 embedded."""


def check_texts_unseen(settings, sae_meta: dict[str, Any], texts: Texts) -> None:
    """Refuse evaluation texts that the SAE's activation run embedded (EVAL_DATASET holding training
    texts, or EVAL_SHARE changed since stage 01): labels read off training texts would flatter it.

    The run is the SAE's own, or for an SAE from SAE_PATH that does not name one, the store's current
    run; with no run in the store there is nothing stage 01 embedded."""
    run_id = sae_meta.get("activation_run_id")
    if run_id is None and not (settings.store / RUN_ID_FILE).exists():
        return
    run = open_run(settings.store, run_id)
    seen = run.count_embedded(texts.hashes())
    if seen:
        share = run.meta.get("settings", {}).get("EVAL_SHARE")
        raise EvalOverlapError(
            f"{seen} of the {len(texts)} evaluation texts ({texts.source}) were embedded by stage 01 (run {run.run_id}), "
            "so the concepts would be read off texts the SAE was trained on. Set EVAL_DATASET to texts that are not "
            f"in the training data{f', and EVAL_SHARE to {share} as stage 01 had it' if share is not None else ''}, "
            "or run stage 01 again with these settings.")


def name_concepts(settings, built, codes, namer: Namer | None, progress: bool) -> None:
    """Name the N_LATENTS_TO_NAME most frequent latents of `built` with `namer` (none: labels only)."""
    if namer is None:
        return
    ranked = sorted(built.records, key=lambda i: -built.records[i]["frequency"])
    chosen = ranked if settings.N_LATENTS_TO_NAME == 0 else ranked[:settings.N_LATENTS_TO_NAME]
    tasks = {i: naming_task(codes, built.namer_examples[i], built.windows[i], settings.CONTEXT_TOKENS)
             for i in chosen if built.namer_examples[i]}
    apply_names(built, name_latents(namer, tasks, settings.store / "concept_names.json", progress=progress),
                settings.NAME_MIN_SCORE)
    built.meta["naming"] = (f"{len(tasks)} most frequent latents named by {settings.NAMING_MODEL_ID}; a name is "
                            "the title only where it scores above the label on the same held-out windows, and at "
                            f"least {settings.NAME_MIN_SCORE} (detection and fuzzing; 0.5 is chance).")


def run_concepts(settings, progress: bool = True, device: torch.device | None = None,
                 world: World = World()) -> dict[str, Any] | None:
    """Stage 04: returns the published concepts ({"meta": ..., "latents": ...}).

    Under torchrun (python -m saekit.concepts.runner) the ranks collect codes over shares of the texts;
    rank 0 labels, names and publishes, and the other ranks return None."""
    device = device or detect_device(settings.DEVICE)
    sae, sae_meta = load_sae(settings, device)  # stage 02's SAE, or SAE_PATH's SAELens folder
    check_sae_matches(sae_meta, settings.MODEL_ID, settings.LAYER_SIGNATURE, settings.target)
    model, tokenizer = load_stage_model(settings, device, world)
    texts = load_role_texts(settings, "eval")  # never texts that the SAE was trained on
    check_texts_unseen(settings, sae_meta, texts)
    if world.is_main:
        print(texts.summary())
    read = read_parts(texts.texts, tokenizer, settings.MAX_LENGTH)
    layer = resolve_layer(model, settings.LAYER_SIGNATURE)
    codes = collect(model, tokenizer, layer, sae, read,
                    max_length=settings.MAX_LENGTH, batch_size=settings.BATCH_SIZE_SAVE,
                    progress=progress and world.is_main, world=world)
    if not world.is_main:
        return None
    live = sorted({int(i) for i in codes.firing[1]})
    meta = {"model_id": settings.MODEL_ID, "layer_signature": settings.LAYER_SIGNATURE,
            "train_target": sae.kind, "target_signature": settings.target,
            "activation_run_id": sae_meta.get("activation_run_id"), "sae_id": sae_meta.get("sae_id"), "k": sae.k,
            "layer_module": layer_names(model)[settings.LAYER_SIGNATURE], "d_model": sae.d_in,
            "model_layers": getattr(model.config, "num_hidden_layers", None), "max_length": settings.MAX_LENGTH,
            "dataset": settings.EVAL_DATASET or settings.HF_DATASET, "split": texts.read_from.get("split"),
            "texts_read": texts.read_from, "source": texts.source, "n_texts_asked": settings.EVAL_DATA_LIMIT,
            "naming_model_id": settings.NAMING_MODEL_ID,
            "naming": NO_NAMES_NOTE if settings.NAMING_MODEL_ID == NO_NAMER else None, "settings": settings.as_dict(),
            "dead_latents": training_deadness(settings.store, sae_meta.get("sae_id"), chosen_name(settings))}
    stats = latent_stats(codes)
    # measured on the choosing half's texts: the output side feeds a label rule, which the other half scores
    is_scoring = scoring_half(len(texts.texts), settings.SEED)
    choosing_texts = [t for t, scoring in zip(texts.texts, is_scoring) if not scoring]
    by_frequency = sorted(live, key=lambda i: (-stats.fire_counts[i], i))
    measure = by_frequency if settings.OUTPUT_EFFECT_LATENTS == 0 else by_frequency[:settings.OUTPUT_EFFECT_LATENTS]
    # a transcoder's latents write into its target (the MLP's output): their output side is measured there
    written = resolve_layer(model, settings.target, "TARGET_SIGNATURE") if settings.target else layer
    sides, meta["output_side"] = output_sides(model, tokenizer, written, sae, live, measure,
                                              {i: float(stats.max_activation[i]) for i in measure},
                                              choosing_texts[:settings.OUTPUT_EFFECT_TEXTS], settings.BATCH_SIZE_SAVE)
    built = build_concepts(codes, sides, meta, top_n=settings.TOP_N_EXAMPLES,
                           context=settings.CONTEXT_TOKENS, per_quantile=settings.QUANTILE_EXAMPLES,
                           non_activating=settings.NON_ACTIVATING_EXAMPLES, scoring_examples=settings.SCORING_EXAMPLES,
                           max_keys=settings.LABEL_MAX_KEYS, min_f1=settings.LABEL_MIN_F1,
                           min_support=settings.LABEL_MIN_SUPPORT, seed=settings.SEED)
    try:
        name_concepts(settings, built, codes, open_namer(settings, device, model, tokenizer), progress)
    except EndpointUnreachableError as err:  # the labels stand on their own: publish them, and say so once
        built.meta["naming"] = (f"labels only: the naming endpoint {settings.NAMING_MODEL_ID} could not be reached; "
                                "rerun stage 04 once it answers (names already scored are cached)")
        print(f"naming skipped, labels only: {err}")
    folder = publish(settings.store, built)
    print(f"published {folder}")
    return {"meta": {**built.meta, "concepts_id": folder.name}, "latents": built.records}


if __name__ == "__main__":  # stage 04 as a script, e.g. under torchrun: torchrun --nproc_per_node=N -m saekit.concepts.runner
    import sys

    stage_settings, _ = start_stage("04 name SAE concepts", sys.argv[1:])
    stage_device, stage_world = stage_runtime(stage_settings)
    run_concepts(stage_settings, device=stage_device, world=stage_world)
    leave_world(stage_world)
