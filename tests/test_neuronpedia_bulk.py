"""store/neuronpedia/bulk/: Neuronpedia's bulk-import layout, every row checked against what its admin import
reads (hijohnnylin/neuronpedia@ebb8426: apps/webapp/app/api/admin/import/route.ts, lib/db/import.ts,
prisma/schema.prisma).

release.jsonl, model.jsonl, sourceset.jsonl and source.jsonl go through prisma's create, which refuses a
key that is not a field and a missing field that has no default; features/, activations/ and explanations/
through a SQL insert (jsonb_to_recordset) whose columns are those of each file's first line, with no prisma
default applied (an id with @default(cuid()) must be given). Foreign keys must point at rows imported before."""
import gzip
import json
from pathlib import Path

import pytest

from conftest import synthetic_concept_set
from saekit.concepts import neuronpedia as NP
from saekit.concepts.exports import apply_names, publish
from saekit.concepts.naming import Name

# schema.prisma at ebb8426, per table: column -> (type, required). Required: not null and no default the
# insert applies (prisma's own @default(cuid()) is not applied by the SQL insert: such an id is required)
S, I, F, B, D, J, V = "String", "Int", "Float", "Boolean", "DateTime", "Json", "Visibility"
TABLES = {
    "release.jsonl": {"name": (S, True), "visibility": (V, False), "isNewUi": (B, False), "featured": (B, False),
                      "description": (S, True), "descriptionShort": (S, False), "creatorEmail": (S, False),
                      "creatorName": (S, True), "creatorNameShort": (S, False), "creatorId": (S, True),
                      "defaultSourceSetName": (S, False), "defaultSourceId": (S, False),
                      "defaultUmapSourceIds": ([S], False), "createdAt": (D, False), "urls": ([S], False)},
    "model.jsonl": {"id": (S, True), "displayNameShort": (S, False), "displayName": (S, False), "creatorId": (S, True),
                    "tlensId": (S, False), "openRouterId": (S, False), "dimension": (I, False), "thinking": (B, False),
                    "visibility": (V, False), "defaultSourceSetName": (S, False), "defaultSourceId": (S, False),
                    "defaultGraphSourceSetName": (S, False), "inferenceEnabled": (B, False), "instruct": (B, False),
                    "layers": (I, True), "neuronsPerLayer": (I, True), "createdAt": (D, False), "owner": (S, True),
                    "updatedAt": (D, False), "website": (S, False)},
    "sourceset.jsonl": {"modelId": (S, True), "name": (S, True), "hasDashboards": (B, False),
                        "allowInferenceSearch": (B, False), "visibility": (V, False), "description": (S, True),
                        "type": (S, False), "creatorName": (S, True), "creatorEmail": (S, False), "creatorId": (S, True),
                        "releaseName": (S, False), "hasGraphs": (B, False), "graphEnabled": (B, False),
                        "similarityMatrixEnabled": (B, False), "defaultOfModelId": (S, False),
                        "defaultGraphModelId": (S, False), "defaultRange": (I, False), "defaultShowBreaks": (B, False),
                        "showDfa": (B, False), "showCorrelated": (B, False), "showHeadAttribution": (B, False),
                        "showUmap": (B, False), "createdAt": (D, False), "urls": ([S], False)},
    "source.jsonl": {"id": (S, True), "modelId": (S, True), "hasDashboards": (B, False), "inferenceEnabled": (B, False),
                     "saelensConfig": (J, False), "saelensRelease": (S, False), "saelensSaeId": (S, False),
                     "hfRepoId": (S, False), "hfFolderId": (S, False), "visibility": (V, False),
                     "defaultOfModelId": (S, False), "setName": (S, True), "creatorId": (S, True), "hasUmap": (B, False),
                     "hasUmapLogSparsity": (B, False), "hasUmapClusters": (B, False), "num_prompts": (I, False),
                     "num_tokens_in_prompt": (I, False), "dataset": (S, False), "notes": (S, False),
                     "cosSimMatchModelId": (S, False), "cosSimMatchSourceId": (S, False), "createdAt": (D, False)},
    "features": {"modelId": (S, True), "layer": (S, True), "index": (S, True), "sourceSetName": (S, False),
                 "creatorId": (S, False), "createdAt": (D, False), "maxActApprox": (F, False), "hasVector": (B, False),
                 "vector": ([F], False), "vectorLabel": (S, False), "vectorDefaultSteerStrength": (F, False),
                 "hookName": (S, False), "topkCosSimIndices": ([I], False), "topkCosSimValues": ([F], False),
                 **{c: ([F], False) for c in ("neuron_alignment_values", "neuron_alignment_l1",
                                              "correlated_neurons_pearson", "correlated_neurons_l1",
                                              "correlated_features_pearson", "correlated_features_l1", "neg_values",
                                              "pos_values", "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
                                              "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                                              "decoder_weights_dist")},
                 **{c: ([I], False) for c in ("neuron_alignment_indices", "correlated_neurons_indices",
                                              "correlated_features_indices")},
                 "neg_str": ([S], False), "pos_str": ([S], False), "frac_nonzero": (F, False),
                 "umap_cluster": (I, False), "umap_log_feature_sparsity": (F, False), "umap_x": (F, False),
                 "umap_y": (F, False)},
    "activations": {"id": (S, True), "dataIndex": (S, False), "index": (S, True), "layer": (S, True),
                    "modelId": (S, True), "dataSource": (S, False), "maxValue": (F, True),
                    "maxValueTokenIndex": (I, True), "minValue": (F, True), "tokens": ([S], True),
                    "values": ([F], True), "dfaValues": ([F], False), "dfaTargetIndex": (I, False),
                    "dfaMaxValue": (F, False), "zQIndices": ([I], False), "zKIndices": ([I], False),
                    "zValues": ([F], False), "creatorId": (S, True), "createdAt": (D, False),
                    "lossValues": ([F], False), "logitContributions": (S, False), "binMin": (F, False),
                    "binMax": (F, False), "binContains": (F, False), "qualifyingTokenIndex": (I, False)},
    "explanations": {"id": (S, True), "modelId": (S, True), "layer": (S, True), "index": (S, True),
                     "description": (S, True), "authorId": (S, True), "triggeredByUserId": (S, False),
                     "notes": (S, False), "scoreV1": (F, False), "scoreV2": (F, False), "umap_x": (F, False),
                     "umap_y": (F, False), "umap_cluster": (I, False), "umap_log_feature_sparsity": (F, False),
                     "typeName": (S, False), "explanationModelName": (S, False), "createdAt": (D, False),
                     "updatedAt": (D, False)},
}
PYTHON_TYPES = {S: str, I: int, F: (int, float), B: bool, D: str, J: dict, V: str}


def _fits(value, kind) -> bool:
    if value is None:
        return True  # allowed only where not required (checked apart)
    if isinstance(kind, list):
        return isinstance(value, list) and all(_fits(v, kind[0]) and v is not None for v in value)
    if kind == V:
        return value in ("PUBLIC", "UNLISTED", "PRIVATE")
    if kind in (I, F) and isinstance(value, bool):
        return False
    return isinstance(value, PYTHON_TYPES[kind])


def _rows(path: Path) -> list[dict]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def _bulk(store: Path) -> tuple[Path, dict[str, list[dict]]]:
    """The one source folder under bulk/ (<model>/<source>, as the import reads it from S3), file by file."""
    folders = [p for p in (store / "neuronpedia" / NP.BULK_DIR).glob("*/*") if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0], {str(p.relative_to(folders[0])): _rows(p) for p in sorted(folders[0].rglob("*")) if p.is_file()}


def _check_against_the_importer(folder: Path, files: dict[str, list[dict]], n_latents: int) -> None:
    for name in ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl"):
        assert len(files[name]) == 1, name
    for name, rows in files.items():
        table = TABLES[name if "/" not in name else name.split("/")[0]]
        if "/" in name:
            assert name.endswith(".jsonl.gz") and rows, name  # getFilesInPath(..., '.jsonl.gz')
        assert all(set(row) == set(rows[0]) for row in rows), name  # the insert's columns come from the first line
        for row in rows:
            assert set(row) <= set(table), (name, set(row) - set(table))
            for column, (kind, required) in table.items():
                assert column in row or not required, (name, column)
                assert row.get(column) is not None or not required, (name, column)
                assert _fits(row.get(column), kind), (name, column, row.get(column))
    release, model, sourceset, source = (files[f][0] for f in ("release.jsonl", "model.jsonl", "sourceset.jsonl",
                                                                "source.jsonl"))
    # the S3 path the route reads: v1/<modelId>/<sourceId>; every foreign key to a row imported before it
    assert (folder.parent.name, folder.name) == (model["id"], source["id"])
    assert sourceset["modelId"] == source["modelId"] == model["id"] and sourceset["releaseName"] == release["name"]
    assert source["setName"] == sourceset["name"] and source["id"].split("-", 1) == [source["id"].split("-")[0],
                                                                                      sourceset["name"]]
    creators = {release["creatorId"], model["creatorId"], sourceset["creatorId"], source["creatorId"]}
    features = [row for name, rows in files.items() if name.startswith("features/") for row in rows]
    assert sorted(int(f["index"]) for f in features) == list(range(n_latents))  # every latent, dead ones too
    assert {(f["modelId"], f["layer"], f["sourceSetName"]) for f in features} == {(model["id"], source["id"],
                                                                                   sourceset["name"])}
    neurons = {(f["modelId"], f["layer"], f["index"]) for f in features}
    for kind, creator in (("activations", "creatorId"), ("explanations", "authorId")):
        rows = [row for name, rows in files.items() if name.startswith(f"{kind}/") for row in rows]
        assert rows and {(r["modelId"], r["layer"], r["index"]) for r in rows} <= neurons, kind
        assert len({r["id"] for r in rows}) == len(rows), kind  # primary keys
        creators |= {r[creator] for r in rows}
    creators |= {f["creatorId"] for f in features}
    assert len(creators) == 1
    for a in (row for name, rows in files.items() if name.startswith("activations/") for row in rows):
        assert len(a["tokens"]) == len(a["values"]) and a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
        assert a["minValue"] == min(a["values"]) and 0 <= a["qualifyingTokenIndex"] < len(a["values"])


def test_the_bulk_import_layout_holds_what_neuronpedias_import_reads(tmp_path):
    built = synthetic_concept_set(300)
    unexplained = min(i for i, r in built.records.items() if not r["label"]["explained"])
    apply_names(built, {unexplained: Name("things", 1.0, 1.0)}, 0.7)
    publish(tmp_path, built)
    folder, files = _bulk(tmp_path)
    _check_against_the_importer(folder, files, 300)
    assert folder.relative_to(tmp_path / "neuronpedia" / "bulk") == Path("bielik-1.5b-v3.0-instruct/16-saekit-300")
    # the explanations are the titles the upload bodies carry: the whole set, titles included, on one path
    uploads = [json.loads(p.read_text()) for p in sorted((tmp_path / "neuronpedia" / "upload").glob("*.json"))]
    offered = {str(f["index"]): f["explanations"][0]["text"] for body in uploads for f in body["features"]
               if f["explanations"]}
    explained = {r["index"]: r["description"] for name, rows in files.items() if name.startswith("explanations/")
                 for r in rows}
    assert explained == offered and explained[str(unexplained)] == "things"
    # the activations are the batch files' examples, value for value
    batches = [json.loads(p.read_text()) for p in sorted((tmp_path / "neuronpedia").glob("batch-*.json"))]
    examples = sorted((str(f["feature_index"]), a["tokens"], a["values"]) for b in batches for f in b["features"]
                      for a in f["activations"])
    rows = sorted((r["index"], r["tokens"], r["values"]) for name, rs in files.items() if name.startswith("activations/")
                  for r in rs)
    assert rows == examples


def test_the_neuronpedia_settings_name_every_file_alike(tmp_path):
    built = synthetic_concept_set(200)
    built.meta["settings"] = {"NEURONPEDIA_MODEL_ID": "bielik-1.5b", "NEURONPEDIA_SOURCE_SET": "res-tiny",
                              "NEURONPEDIA_RELEASE": "my-release", "NEURONPEDIA_HOOK_POINT": "blocks.16.hook_resid_mid",
                              "NEURONPEDIA_CREATOR_ID": "user-1", "NEURONPEDIA_CREATOR_NAME": "Me"}
    publish(tmp_path, built)
    folder, files = _bulk(tmp_path)
    _check_against_the_importer(folder, files, 200)
    assert folder.parent.name == "bielik-1.5b" and folder.name == "16-res-tiny"
    assert files["release.jsonl"][0]["name"] == "my-release" and files["sourceset.jsonl"][0]["creatorName"] == "Me"
    assert files["source.jsonl"][0]["saelensConfig"]["hook_name"] == "blocks.16.hook_resid_mid"
    assert files["features/batch-0.jsonl.gz"][0]["creatorId"] == "user-1"
    exported = tmp_path / "neuronpedia"
    skipped = json.loads((exported / "skipped_indexes.json").read_text())
    assert (skipped["model_id"], skipped["layer"], skipped["sae_set"]) == ("bielik-1.5b", "16", "res-tiny")
    for path in exported.glob("batch-*.json"):
        batch = json.loads(path.read_text())
        assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("bielik-1.5b", 16, "res-tiny")
    for path in (exported / "upload").glob("*.json"):
        body = json.loads(path.read_text())
        assert (body["modelId"], body["source"]) == ("bielik-1.5b", "16-res-tiny")
    assert json.loads((exported / "run_settings.json").read_text())["neuronpedia"]["release"] == "my-release"


@pytest.mark.parametrize("value", ["Has-Capitals", "with space", "-leading-dash", "a/b"])
def test_neuronpedia_ids_are_checked(value):
    from saekit.base.settings import SettingsError, load_settings

    for key in ("NEURONPEDIA_MODEL_ID", "NEURONPEDIA_SOURCE_SET", "NEURONPEDIA_RELEASE"):
        with pytest.raises(SettingsError, match=f"{key}="):
            load_settings([f"--{key}={value}"])


def test_stage_04s_bulk_import_of_the_tiny_model_passes_the_same_checks(tmp_path, smoke_args):
    from conftest import copy_store, run_python

    store = tmp_path / "store"
    args = copy_store(smoke_args, store, "concepts*")
    proc = run_python(["-m", "saekit.concepts.runner", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder, files = _bulk(store)
    _check_against_the_importer(folder, files, 64)  # N_LATENTS_MULTIPLIER=2 of 32
    model, source = files["model.jsonl"][0], files["source.jsonl"][0]
    assert (model["layers"], model["dimension"]) == (3, 32)  # the tiny Llama's blocks and width
    assert source["id"] == "1-saekit-64" and source["num_tokens_in_prompt"] == 24
    assert source["saelensConfig"]["hook_name"] == "model.layers.1.post_attention_layernorm"


@pytest.mark.parametrize("value", ["double--hyphen", "ends-", "neurons", "9lives", "a.b"])
def test_a_source_set_name_neuronpedia_would_refuse_is_refused(value):
    from saekit.base.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="NEURONPEDIA_SOURCE_SET="):
        load_settings([f"--NEURONPEDIA_SOURCE_SET={value}"])
