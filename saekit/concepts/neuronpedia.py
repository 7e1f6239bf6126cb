"""Stage 04's concepts in the files Neuronpedia imports, written to store/neuronpedia/ with every set.

    store/neuronpedia/
        batch-<n>.json        SAEDashboard's NeuronpediaRunner output: {model_id, layer, sae_set, sae_id_suffix,
                              features: [...]}, 128 live latents each, by index. Neuronpedia's converter
                              (neuronpedia-utils convert-saedashboard-to-neuronpedia-export.py, or SAEDashboard's
                              neuronpedia_export.py) turns the folder into its bulk-import layout.
        skipped_indexes.json  the dead latents, as NeuronpediaRunner records them; the body of Neuronpedia's
                              /api/admin/upload-skipped-features, which creates them as dead features. Dead
                              means silent on stage 02's held-out rows (far more tokens than stage 04's
                              texts) where stage 02 trained the SAE here; run_settings.json says which
                              tokens decided it, and how many latents are silent on stage 04's texts alone
        run_settings.json     what made the export (NeuronpediaRunner writes its settings here): the
                              concepts set, SAE, model, layer, and which fields hold no data
        upload/batch-<n>.json bodies for POST /api/feature/upload-batch (the route a user with an API key
                              may call): the same latents and examples, with the title as the explanation
                              where it explains the latent
        bulk/<model>/<source>/ Neuronpedia's bulk-import layout, as its admin import route reads it from
                              s3://neuronpedia-datasets/v1/<model>/<source>/: release.jsonl, model.jsonl,
                              sourceset.jsonl, source.jsonl, features/, activations/ and explanations/
                              batch-<n>.jsonl.gz. Everything above in one path, titles included

The ids (model, source set, release, hook point, creator) come from the NEURONPEDIA_* settings and are the
same in every file (`neuronpedia_ids`).

Per live latent (SAEDashboard's keys; the values are stage 04's record for the latent):

    activations    its top examples, then its examples by quantile, each {tokens, values,
                   qualifying_token_index, bin_min, bin_max, bin_contains}: the window of CONTEXT_TOKENS
                   each side of the peak, the latent's activation on each token, the peak's index. Top
                   examples carry bin_min = bin_contains = -1 and bin_max = the latent's max activation
                   (SAEDashboard's TOP ACTIVATIONS group); interval examples their interval (min, max]
                   and the share of tokens in it (its INTERVAL groups), from the record's quantile_bins
    pos_str, pos_values / neg_str, neg_values    the output side (saekit.concepts.output_side): promoted and
                   suppressed tokens, measured or the direct lens where it holds; empty where it is N/A
    frac_nonzero   the share of tokens it fires on
    freq_hist_data_bar_heights / _values         its activation histogram: tokens per bin, bin centres
    n_prompts_total, n_tokens_in_prompt, dataset the texts it was read from

Kept empty, because stage 04 does not compute them (Neuronpedia shows nothing for an empty list, as for
features created by upload-skipped-features): neuron_alignment_*, correlated_neurons_*,
correlated_features_*, logits_hist_data_*, decoder_weights_dist, vector.

The format was read (no code copied) from
    jbloomAus/SAEDashboard at db4839a41116d729fc9f43c1878e7b8b157748ea:
        sae_dashboard/neuronpedia/neuronpedia_runner.py     batch-<n>.json, run_settings.json, skipped_indexes.json
        sae_dashboard/neuronpedia/neuronpedia_dashboard.py  NeuronpediaDashboardBatch/Feature/Activation.to_dict
        sae_dashboard/neuronpedia/neuronpedia_converter.py  what each key holds (group titles to bins, DENSITY)
        sae_dashboard/neuronpedia/neuronpedia_export.py     batch files to Neuronpedia's bulk-import layout
        sae_dashboard/sequence_data_generator.py, sae_vis_runner.py, utils_fns.py  groups, frac_nonzero, histogram
    hijohnnylin/neuronpedia at ebb8426fc550ad5d1f76d52c271a624af3c08a57:
        utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py  the keys it reads
        apps/webapp/app/api/feature/upload-batch/route.tsx          the upload route's schema, explanations
        apps/webapp/app/api/admin/upload-skipped-features/route.tsx skipped_indexes.json
        apps/webapp/components/activations-list.tsx, feature-stats.tsx  how bins and the histogram are shown
        apps/webapp/app/api/admin/import/route.ts, lib/db/import.ts, lib/utils/s3.ts, prisma/schema.prisma
                                                                    the bulk import: files, tables, columns
        apps/webapp/app/api/source-set/new/route.tsx                a source set's name
        webapp-python-client/neuronpedia/requests/feature_request.py    128 features per upload

The folder is replaced whole, right before stage 04's pointer names the new set (saekit.concepts.exports.publish):
a reader finds the export of the current set, or, after a kill at that moment, none.
"""
from __future__ import annotations

import gzip
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..activations.data import EMBEDDED_DATASET
from ..activations.models import EMBEDDED_CACHE_NAME, EMBEDDED_MODEL, public_model_id
from ..training.saelens_format import saelens_hook_name

NEURONPEDIA_DIR = "neuronpedia"
UPLOAD_DIR = "upload"
BULK_DIR = "bulk"  # bulk/<model>/<source>/ is what goes to s3://neuronpedia-datasets/v1/<model>/<source>/
# the user a fresh Neuronpedia creates first (apps/webapp/prisma/seed.ts, lib/env.ts DEFAULT_CREATOR_USER_ID)
DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"
DEFAULT_CREATOR_NAME = "saekit"
VISIBILITY = "PUBLIC"  # schema.prisma's Visibility: PUBLIC, UNLISTED or PRIVATE
# the Neuron table's columns that a batch's feature carries under the same name (the converter's copy)
NEURON_COLUMNS = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                  "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
                  "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
                  "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
                  "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                  "decoder_weights_dist")
RUN_SETTINGS_FILE, SKIPPED_FILE = "run_settings.json", "skipped_indexes.json"
FEATURES_PER_BATCH = 128  # NeuronpediaRunner's n_features_at_a_time, and the upload route's maximum
EXPLANATION_MAX_CHARS = 512  # the upload route's limit
SOURCES = {
    "jbloomAus/SAEDashboard@db4839a41116d729fc9f43c1878e7b8b157748ea": [
        "sae_dashboard/neuronpedia/neuronpedia_runner.py", "sae_dashboard/neuronpedia/neuronpedia_dashboard.py",
        "sae_dashboard/neuronpedia/neuronpedia_converter.py", "sae_dashboard/neuronpedia/neuronpedia_export.py"],
    "hijohnnylin/neuronpedia@ebb8426fc550ad5d1f76d52c271a624af3c08a57": [
        "utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py",
        "apps/webapp/app/api/feature/upload-batch/route.tsx",
        "apps/webapp/app/api/admin/upload-skipped-features/route.tsx",
        "apps/webapp/app/api/admin/import/route.ts", "apps/webapp/lib/db/import.ts", "apps/webapp/lib/utils/s3.ts",
        "apps/webapp/prisma/schema.prisma", "apps/webapp/app/api/source-set/new/route.tsx"],
}
EMPTY_FIELDS = {
    "neuron_alignment_indices": "not computed by stage 04", "neuron_alignment_values": "not computed by stage 04",
    "neuron_alignment_l1": "not computed by stage 04", "correlated_neurons_indices": "not computed by stage 04",
    "correlated_neurons_l1": "not computed by stage 04", "correlated_neurons_pearson": "not computed by stage 04",
    "correlated_features_indices": "not computed by stage 04", "correlated_features_l1": "not computed by stage 04",
    "correlated_features_pearson": "not computed by stage 04",
    "logits_hist_data_bar_heights": "stage 04 keeps the output side's top and bottom 10 tokens, not the "
                                    "vocabulary's histogram",
    "logits_hist_data_bar_values": "as logits_hist_data_bar_heights", "decoder_weights_dist": "attention SAEs only",
    "vector": "steering vectors only",
}


def neuronpedia_model_id(model_id: str) -> str:
    """A Neuronpedia-style model id (lower case, dashes): the embedded model's name, or the last part of
    a hub id or folder."""
    name = EMBEDDED_CACHE_NAME if model_id == EMBEDDED_MODEL else Path(str(model_id).rstrip("/")).name
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "model"


def layer_number(layer_signature: str) -> int:
    """The block number in a layer signature (..._layers_15_post_attention_layernorm: 15), 0 if none."""
    found = re.search(r"_(\d+)(?:_|$)", layer_signature)
    return int(found.group(1)) if found else 0


def dataset_name(meta: dict[str, Any]) -> str:
    """The texts' dataset: a hub id or file as set, or for the embedded corpus the source stage 04 read."""
    dataset = str(meta.get("dataset") or "")
    return str(meta.get("source") or dataset) if dataset in ("", EMBEDDED_DATASET) else dataset


def sae_set_name(meta: dict[str, Any]) -> str:
    return f"saekit-{meta['n_latents']}"


def _window(texts: dict[str, Any], example: dict[str, Any], context: int) -> tuple[list[str], list[float], int]:
    """(tokens, the latent's activation on each, index of the peak) of an example's window."""
    doc, pos = example["doc"], example["pos"]
    ids = texts["tokens"][doc]
    start, stop = max(0, pos - context), min(len(ids), pos + context + 1)
    acts = {int(p): float(a) for p, a in example["acts"]}
    return ([texts["vocab"][ids[p]] for p in range(start, stop)], [acts.get(p, 0.0) for p in range(start, stop)],
            pos - start)


def feature_activations(record: dict[str, Any], texts: dict[str, Any], context: int) -> list[dict[str, Any]]:
    """The latent's examples as NeuronpediaDashboardActivation dicts: top examples, then by quantile, highest first."""
    bins = {b["quantile"]: b for b in record["quantile_bins"]}
    activations = []
    for group, examples in (("top", record["examples"]["top"]), ("quantiles", record["examples"]["quantiles"])):
        for e in examples:
            tokens, values, peak = _window(texts, e, context)
            if group == "top":
                bin_min, bin_max, bin_contains = -1, record["max_activation"], -1
            else:
                b = bins[e["quantile"]]
                bin_min, bin_max, bin_contains = b["min"], b["max"], b["contains"]
            activations.append({"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains,
                                "tokens": tokens, "values": values, "qualifying_token_index": peak})
    return activations


def histogram_bars(histogram: dict[str, list]) -> tuple[list[float], list[int]]:
    """(bar centres, counts) of the recorded histogram; its bins are log-spaced, so a bar's centre is the
    geometric mean of its edges."""
    edges = histogram["bin_edges"]
    return [round(math.sqrt(lo * hi), 5) for lo, hi in zip(edges, edges[1:])], list(histogram["counts"])


def dashboard_feature(record: dict[str, Any], texts: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """One live latent as a NeuronpediaDashboardFeature dict (its to_dict's keys, in its order)."""
    lens = record["output_side"]
    bar_values, bar_heights = histogram_bars(record["histogram"])
    return {
        "feature_index": record["index"],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": [t for t, _ in lens["suppressed"]], "neg_values": [float(v) for _, v in lens["suppressed"]],
        "pos_str": [t for t, _ in lens["promoted"]], "pos_values": [float(v) for _, v in lens["promoted"]],
        "frac_nonzero": record["frequency"],
        "freq_hist_data_bar_values": bar_values, "freq_hist_data_bar_heights": bar_heights,
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "n_prompts_total": meta["n_texts"], "n_tokens_in_prompt": max((len(t) for t in texts["tokens"]), default=0),
        "dataset": dataset_name(meta),
        "decoder_weights_dist": [],
        "activations": feature_activations(record, texts, meta["context_tokens"]),
        "vector": [],
    }


def explanation(record: dict[str, Any]) -> str | None:
    """The title, where it explains the latent: a name that beat the label, or a label above LABEL_MIN_F1.
    An unexplained latent's best attempt is not an explanation."""
    if record["title_source"] == "name" or record["label"]["explained"]:
        return record["title"][:EXPLANATION_MAX_CHARS]
    return None


def upload_feature(feature: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The same latent as the upload route takes it. Its explanation has no methodName or modelName: the
    route refuses names that are not in Neuronpedia's own lists."""
    text = explanation(record)
    return {
        "index": feature["feature_index"], "density": feature["frac_nonzero"],
        "topLogits": [{"token": t, "value": v} for t, v in zip(feature["pos_str"], feature["pos_values"])],
        "bottomLogits": [{"token": t, "value": v} for t, v in zip(feature["neg_str"], feature["neg_values"])],
        "explanations": [{"text": text, "methodName": None, "modelName": None}] if text else [],
        # the route keeps quantileMin/Max as binMin/binMax; quantileFraction must lie in [0, 1], so a top
        # example's -1 becomes null
        "activations": [{"tokens": a["tokens"], "values": a["values"], "quantileMin": a["bin_min"],
                         "quantileMax": a["bin_max"],
                         "quantileFraction": None if a["bin_contains"] < 0 else a["bin_contains"]}
                        for a in feature["activations"]],
    }


@dataclass(frozen=True)
class NeuronpediaIds:
    """The names every file of the export agrees on: the NEURONPEDIA_* settings, or their defaults."""

    model: str  # Neuronpedia's model id
    layer: int  # the block number, which leads the source id
    source_set: str
    release: str
    hook_point: str
    creator_id: str
    creator_name: str

    @property
    def source(self) -> str:
        """The source's id, as Neuronpedia forms it: <layer>-<source set>."""
        return f"{self.layer}-{self.source_set}"


def neuronpedia_ids(meta: dict[str, Any]) -> NeuronpediaIds:
    """The ids from the settings stage 04 ran with (meta["settings"]); an empty setting takes its default."""
    settings = meta.get("settings") or {}
    model = settings.get("NEURONPEDIA_MODEL_ID") or neuronpedia_model_id(public_model_id(meta["model_id"]))
    source_set = settings.get("NEURONPEDIA_SOURCE_SET") or sae_set_name(meta)
    return NeuronpediaIds(
        model=model, layer=layer_number(meta["layer_signature"]), source_set=source_set,
        release=settings.get("NEURONPEDIA_RELEASE") or f"{model}-{source_set}",
        hook_point=settings.get("NEURONPEDIA_HOOK_POINT") or saelens_hook_name(meta["layer_signature"],
                                                                               meta.get("layer_module")),
        creator_id=settings.get("NEURONPEDIA_CREATOR_ID") or DEFAULT_CREATOR_ID,
        creator_name=settings.get("NEURONPEDIA_CREATOR_NAME") or DEFAULT_CREATOR_NAME)


def bulk_import_files(ids: NeuronpediaIds, meta: dict[str, Any], records: dict[int, dict[str, Any]],
                      batches: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Neuronpedia's bulk-import layout, under bulk/<model>/<source>/ as its admin import route reads it from
    s3://neuronpedia-datasets/v1/<model>/<source>/: {path: rows} for .jsonl and .jsonl.gz files.

    Each row holds only columns of its table (schema.prisma), every column that has no default, and the
    same keys as the file's first row (the route takes the columns from it). The first four files go
    through prisma's create (which refuses unknown keys); the others through a SQL insert that ignores rows
    already there, so the activations' and explanations' ids carry the concepts set's id."""
    created = meta.get("created")
    folder = f"{BULK_DIR}/{ids.model}/{ids.source}"
    described = f"saekit SAE {meta.get('sae_id')} ({meta['n_latents']} latents, k = {meta.get('k')}) at {ids.hook_point}"
    files: dict[str, Any] = {
        f"{folder}/release.jsonl": [{
            "name": ids.release, "description": described, "descriptionShort": described[:100],
            "creatorName": ids.creator_name, "creatorNameShort": ids.creator_name, "creatorId": ids.creator_id,
            "visibility": VISIBILITY, "urls": [], "createdAt": created}],
        f"{folder}/model.jsonl": [{
            "id": ids.model, "displayName": ids.model, "displayNameShort": ids.model, "creatorId": ids.creator_id,
            "dimension": meta.get("d_model"), "layers": meta.get("model_layers") or 0, "neuronsPerLayer": 0,
            "owner": public_model_id(meta["model_id"]).split("/")[0] if "/" in public_model_id(meta["model_id"]) else "",
            "instruct": "instruct" in ids.model, "visibility": VISIBILITY, "createdAt": created, "updatedAt": created}],
        f"{folder}/sourceset.jsonl": [{
            "modelId": ids.model, "name": ids.source_set, "description": described, "creatorName": ids.creator_name,
            "creatorId": ids.creator_id, "releaseName": ids.release, "visibility": VISIBILITY, "urls": [],
            "createdAt": created}],
        f"{folder}/source.jsonl": [{
            "id": ids.source, "modelId": ids.model, "setName": ids.source_set, "creatorId": ids.creator_id,
            "visibility": VISIBILITY, "dataset": dataset_name(meta), "num_prompts": meta["n_texts"],
            "num_tokens_in_prompt": meta.get("max_length"),
            "saelensConfig": {"model_name": public_model_id(meta["model_id"]), "hook_name": ids.hook_point,
                              "d_sae": meta["n_latents"], "k": meta.get("k")},
            "notes": f"made by saekit from concepts set {meta.get('concepts_id')}", "createdAt": created}],
    }
    by_index = {f["feature_index"]: f for batch in batches for f in batch}
    for n, start in enumerate(range(0, meta["n_latents"], FEATURES_PER_BATCH)):
        indices = range(start, min(start + FEATURES_PER_BATCH, meta["n_latents"]))
        files[f"{folder}/features/batch-{n}.jsonl.gz"] = [_neuron_row(ids, i, by_index.get(i), created)
                                                         for i in indices]  # dead latents too, with no data
        files[f"{folder}/activations/batch-{n}.jsonl.gz"] = [
            _activation_row(ids, meta, i, j, a, created)
            for i in indices if i in by_index for j, a in enumerate(by_index[i]["activations"])]
        files[f"{folder}/explanations/batch-{n}.jsonl.gz"] = [
            {"id": f"saekit-{meta.get('concepts_id')}-{i}", "modelId": ids.model, "layer": ids.source, "index": str(i),
             "description": text, "authorId": ids.creator_id, "notes": _explanation_note(records[i]),
             "createdAt": created}
            for i in indices if i in records and (text := explanation(records[i])) is not None]
    return {path: rows for path, rows in files.items() if rows}  # a batch with no explanation has no file


def _neuron_row(ids: NeuronpediaIds, index: int, feature: dict[str, Any] | None, created: str | None) -> dict[str, Any]:
    """A row of the Neuron table: the latent's statistics, or for a dead latent, its place with no data."""
    row = {"modelId": ids.model, "layer": ids.source, "index": str(index), "sourceSetName": ids.source_set,
           "creatorId": ids.creator_id, "createdAt": created,
           "maxActApprox": max((max(a["values"]) for a in feature["activations"]), default=0.0) if feature else 0.0}
    for key in NEURON_COLUMNS:
        row[key] = feature[key] if feature else ([] if key != "frac_nonzero" else 0.0)
    return row


def _activation_row(ids: NeuronpediaIds, meta: dict[str, Any], index: int, n: int, activation: dict[str, Any],
                    created: str | None) -> dict[str, Any]:
    """A row of the Activation table: one example, as the converter makes it from a batch's activation."""
    values = activation["values"]
    peak = max(values)
    return {"id": f"saekit-{meta.get('concepts_id')}-{index}-{n}", "modelId": ids.model, "layer": ids.source,
            "index": str(index), "tokens": activation["tokens"], "values": values, "maxValue": peak,
            "maxValueTokenIndex": values.index(peak), "minValue": min(values), "creatorId": ids.creator_id,
            "binMin": activation["bin_min"], "binMax": activation["bin_max"], "binContains": activation["bin_contains"],
            "qualifyingTokenIndex": activation["qualifying_token_index"], "createdAt": created}


def _explanation_note(record: dict[str, Any]) -> str:
    if record["title_source"] == "name":
        return f"model-written name, detection and fuzzing score {record['name']['score']:.3f} on held-out windows"
    label = record["label"]
    return f"saekit label ({label['rule']}), F1 {label['f1']:.3f} on held-out texts"


def deadness(meta: dict[str, Any], live: list[int]) -> tuple[list[int], str, int]:
    """(dead latents, the tokens that decided it, latents silent on stage 04's texts yet not dead).
    Where the meta carries stage 02's held-out check (runner.training_deadness), dead is silent on both
    its rows and stage 04's texts; otherwise on stage 04's texts alone, which the export says."""
    silent = sorted(set(range(meta["n_latents"])) - set(live))
    here = f"{meta['n_tokens']} tokens of stage 04's {meta['n_texts']} evaluation texts"
    decided = meta.get("dead_latents")
    if decided is None:
        return silent, here, 0
    dead = sorted(set(decided["indexes"]) - set(live))  # a latent that fires on either is live
    return dead, f"{decided['decided_on']} and {here}", len(silent) - len(dead)


def export_files(meta: dict[str, Any], records: dict[int, dict[str, Any]], texts: dict[str, Any]
                 ) -> dict[str, Any]:
    """Every file of the export: {path relative to store/neuronpedia: JSON content, or rows for .jsonl(.gz)}."""
    ids = neuronpedia_ids(meta)
    model_id, layer, sae_set = ids.model, ids.layer, ids.source_set
    live = sorted(records)
    files: dict[str, Any] = {}
    batches = []
    for n, start in enumerate(range(0, len(live), FEATURES_PER_BATCH)):
        indices = live[start:start + FEATURES_PER_BATCH]
        features = [dashboard_feature(records[i], texts, meta) for i in indices]
        batches.append(features)
        files[f"batch-{n}.json"] = {"model_id": model_id, "layer": layer, "sae_set": sae_set, "sae_id_suffix": None,
                                    "features": features}
        files[f"{UPLOAD_DIR}/batch-{n}.json"] = {
            "modelId": model_id, "source": ids.source,
            "features": [upload_feature(f, records[i]) for f, i in zip(features, indices)]}
    files.update(bulk_import_files(ids, meta, records, batches))
    dead, decided_on, silent_here = deadness(meta, live)
    files[SKIPPED_FILE] = {"model_id": model_id, "layer": str(layer), "sae_set": sae_set, "log_sparsity": None,
                           "skipped_indexes": dead}
    files[RUN_SETTINGS_FILE] = {
        "concepts_id": meta.get("concepts_id"), "sae_id": meta.get("sae_id"),
        "activation_run_id": meta.get("activation_run_id"), "saekit_model_id": meta["model_id"],
        "layer_signature": meta["layer_signature"], "model_id": model_id, "layer": layer, "sae_set": sae_set,
        "np_sae_id_suffix": None, "d_sae": meta["n_latents"], "live_latents": len(live), "dead_latents": len(dead),
        "dead_decided_on": decided_on, "silent_on_these_texts_not_dead": silent_here,
        "n_features_at_a_time": FEATURES_PER_BATCH, "n_batches": math.ceil(len(live) / FEATURES_PER_BATCH),
        "n_prompts_total": meta["n_texts"], "n_tokens_in_prompt": max((len(t) for t in texts["tokens"]), default=0),
        "huggingface_dataset_path": dataset_name(meta),
        "context_tokens": meta["context_tokens"],
        "histogram": "log-spaced bins (10^-3 to 10^3, 10 a decade); each bar at its bin's geometric centre",
        "quantile_groups": "4 equal-width intervals (min, max] of (0, max activation], examples drawn at random "
                           "within each (one per text, none a top example, each its window's peak); bin_contains is "
                           "the share of all tokens whose activation lies in the interval, so they sum to frac_nonzero",
        "explanations": "upload/ and bulk/.../explanations/: the title where it explains the latent (a name above "
                        "its label, or a label above LABEL_MIN_F1), without a method or model name",
        "neuronpedia": {"model": ids.model, "source_set": ids.source_set, "source": ids.source, "release": ids.release,
                        "hook_point": ids.hook_point, "creator_id": ids.creator_id, "creator_name": ids.creator_name,
                        "bulk_import": f"{BULK_DIR}/{ids.model}/{ids.source}"},
        "empty_fields": EMPTY_FIELDS, "format_read_from": SOURCES,
    }
    return files


def stage_export(store: Path, set_id: str, files: dict[str, Any]) -> Path:
    """Write the export into a hidden folder beside store/neuronpedia; return it. Leftovers of an
    interrupted earlier stage 04 are removed first."""
    for leftover in store.glob(f".{NEURONPEDIA_DIR}.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staged = store / f".{NEURONPEDIA_DIR}.{set_id}.partial"
    try:
        for relative, content in files.items():
            path = staged / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if relative.endswith((".jsonl", ".jsonl.gz")):
                body = "".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in content)
                # mtime 0: the same rows give the same bytes
                path.write_bytes(gzip.compress(body.encode(), mtime=0) if relative.endswith(".gz") else body.encode())
            else:
                path.write_text(json.dumps(content, ensure_ascii=False, separators=(",", ":")))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


class Replacement:
    """Swaps a staged export in for store/neuronpedia around the moment the concepts pointer changes:
    `move_old_away` right before it, `install` right after, `abandon` if publishing failed."""

    def __init__(self, store: Path, staged: Path):
        self.current, self.staged = store / NEURONPEDIA_DIR, staged
        self.old = staged.with_name(staged.name.replace(".partial", ".old"))

    def move_old_away(self) -> None:
        if self.current.exists():
            self.current.rename(self.old)

    def install(self) -> None:
        self.staged.rename(self.current)
        shutil.rmtree(self.old, ignore_errors=True)

    def abandon(self) -> None:
        """Publishing failed: the previous export goes back where it was, with the previous set still current."""
        if self.old.exists() and not self.current.exists():
            self.old.rename(self.current)
        shutil.rmtree(self.staged, ignore_errors=True)

