"""Break the project on purpose, one promise at a time, and check that the tests that guard it fail.

Each mutation replaces one piece of code (it must occur exactly once) in a fresh copy of the project, runs the
tests named for it there, and counts as caught when they fail. A mutation that survives names a promise no test
keeps. Run it before trusting a change to the tests, from the project folder:

    .venv/bin/python tools/mutation_check.py            # every mutation (about 20 minutes on 2 cores)
    .venv/bin/python tools/mutation_check.py --only=splice_mean_is_zero,history_unsealed
    .venv/bin/python tools/mutation_check.py --list

It exits 1 when a mutation survives or no longer applies (the code it breaks has changed: update it here).
Hand-written rather than mutmut or cosmic-ray: those mutate operators at random across the package and rerun the
suite for each, days on 2 cores for a 10-minute suite; these target what the README promises, and each runs only
the tests that should catch it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    promise: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("train_reads_heldout", "training never reads a held-out row",
             "saekit/training/train.py", "heldout_start = run.heldout_start(cfg.heldout_fraction)",
             "heldout_start = run.n_tokens", ("tests/test_train.py::test_training_never_reads_a_heldout_row",)),
    Mutation("splice_mean_is_zero", "mean ablation puts the training mean in the layer's place",
             "saekit/evaluation/splice.py", '"mean": lambda h: mean_activation.to(h.dtype).to(h.device).expand_as(h).clone(),',
             '"mean": torch.zeros_like,', ("tests/test_splice.py",)),
    Mutation("stage03_reports_zero_fvu", "stage 03 reports the held-out FVU and dead share it measured",
             "saekit/evaluation/analysis.py", 'summary = {**stats.summary(), "token_set": heldout_token_set(trained)}',
             'summary = {**stats.summary(), "fvu": 0.0, "dead_fraction": 0.0, "token_set": heldout_token_set(trained)}',
             ("tests/test_notebooks.py::test_stage_03_figures_and_verdict_agree_with_an_independent_pass",)),
    Mutation("auxk_never_added", "AuxK trains the dead latents",
             "saekit/training/train.py", "loss = loss + cfg.auxk_coef * self.auxk_term(",
             "loss = loss + 0 * self.auxk_term(", ("tests/test_train.py",)),
    Mutation("history_unsealed", "stage 03 checks training_history.json's checksum",
             "saekit/evaluation/analysis.py", 'history = read_sealed_json(store / "training_history.json", RERUN_02)',
             'history = __import__("json").loads((store / "training_history.json").read_text())',
             ("tests/test_faults.py::test_an_altered_history_is_refused",)),
    Mutation("sealed_json_unchecked", "a sealed JSON file whose content changed is refused",
             "saekit/base/integrity.py", "if seal(obj)[CHECKSUM_KEY] != obj[CHECKSUM_KEY]:", "if False:",
             ("tests/test_faults.py::test_an_altered_history_is_refused",)),
    Mutation("shards_unchecked", "a corrupt activation shard is refused",
             "saekit/activations/store.py", 'verify_file(self._shard_file(i, kind), shard[f"{kind}_sha256"], RERUN_01)',
             "pass", ("tests/test_faults.py",)),
    Mutation("fvu_scalar_mean", "FVU subtracts the per-dimension mean",
             "saekit/training/reconstruction.py", "return self.sum_sq_x - float((self.sum_x ** 2).sum()) / self.n_tokens",
             "return self.sum_sq_x - float(self.sum_x.sum() ** 2) / (self.n_tokens * len(self.sum_x))",
             ("tests/test_metrics.py",)),
    Mutation("topk_keeps_one_less", "TopK keeps exactly k latents a token",
             "saekit/training/sae.py", "indices = pre.topk(self.k, dim=-1, sorted=False).indices",
             "indices = pre.topk(max(self.k - 1, 1), dim=-1, sorted=False).indices", ("tests/test_sae.py",)),
    Mutation("decoder_not_normalised", "decoder rows stay unit-norm",
             "saekit/training/sae.py", "self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)",
             "pass", ("tests/test_sae.py", "tests/test_train.py")),
    Mutation("verdict_ignores_failures", "the verdict fails when a check fails",
             "saekit/evaluation/verdict.py", 'return all(c["result"] != "FAIL" for c in check_rows)', "return True",
             ("tests/test_verdict.py",)),
    Mutation("verdict_fvu_flipped", "the held-out FVU check passes low FVU, not high",
             "saekit/evaluation/verdict.py", 'heldout["fvu"] <= settings.MAX_HELDOUT_FVU,',
             'heldout["fvu"] >= settings.MAX_HELDOUT_FVU,', ("tests/test_verdict.py",)),
    Mutation("special_tokens_fire", "special tokens never count as a latent's peak",
             "saekit/concepts/collect.py", "values[torch.isin(ids, special_ids)] = 0", "pass",
             ("tests/test_concepts.py",)),
    Mutation("concept_set_unchecked", "an altered file of a concept set is refused",
             "saekit/base/integrity.py", "verify_file(folder / name, digest, rerun)", "pass",
             ("tests/test_concepts.py",)),
    Mutation("labels_scored_where_chosen", "labels are scored on texts that did not choose them",
             "saekit/concepts/exports.py", "labels = choose_labels(codes, keys, is_scoring, live,",
             "labels = choose_labels(codes, keys, np.ones_like(is_scoring), live,",
             ("tests/test_labels.py",)),
    Mutation("name_beats_label_always", "a name is the title only where it scores above its label",
             "saekit/concepts/exports.py", "name.score - label_score > needed", "name.score - label_score > -1",
             ("tests/test_naming.py",)),
    Mutation("probing_accuracy_unbalanced", "probing reports balanced accuracy",
             "saekit/evaluation/probing.py", "return float((y_pred[y_true].mean() + (~y_pred[~y_true]).mean()) / 2)",
             "return float((y_pred == y_true).mean())", ("tests/test_probing.py",)),
    Mutation("last_batch_sliver", "no training step on a sliver of an epoch's leftover rows",
             "saekit/activations/sources.py", "return max(2, (batch_size + 1) // 2)", "return 1",
             ("tests/test_train.py",)),
    Mutation("exclude_tokens_ignored", "EXCLUDE_TOKENS rows stay out of training and the held-out figures",
             "saekit/activations/store.py", "return self._keep if self.excluded else None", "return None",
             ("tests/test_exclude_tokens.py",)),
    Mutation("probing_tasks_chosen_on_test", "probing tasks are chosen on the training stories only",
             "saekit/evaluation/probing.py",
             "dense_cv = cross_validated(dense_probe, x_train[a], y_train)\n"
             "        lexical_cv = cross_validated(lexical_probe, words_train[a], y_train)",
             "dense_cv = cross_validated(dense_probe, x_test[b], y_test)\n"
             "        lexical_cv = cross_validated(lexical_probe, words_test[b], y_test)",
             ("tests/test_probing.py",)),
    Mutation("batchtopk_codes_joined_unpadded", "stage 04 joins BatchTopK codes of batches of different widths",
             "saekit/concepts/collect.py", "parts = [_join_rows(part) if part else None",
             "parts = [torch.cat(part) if part else None", ("tests/test_concepts.py",)),
    Mutation("transcoder_predicts_from_output", "a transcoder spliced in place of the MLP predicts from the MLP's input",
             "saekit/evaluation/splice.py", "return predict(self.captured.float())", "return predict(h)",
             ("tests/test_transcoder.py::test_spliced_in_place_of_the_mlp_a_perfect_predictor_costs_nothing_and_a_zero_one_is_zero_ablation",)),
    Mutation("transcoder_target_unchecked", "a transcoder's stored target is checked against its checksum",
             "saekit/activations/store.py", "        for kind in self._kinds():\n", "        for kind in (\"acts\", \"tokens\"):\n",
             ("tests/test_transcoder.py::test_the_target_is_stored_beside_the_input_and_checksummed",)),
    Mutation("transcoder_learns_its_input", "a transcoder's loss is its target's error, not its input's",
             "saekit/training/train.py", "residual = y - reconstructions[-1]", "residual = x - reconstructions[-1]",
             ("tests/test_transcoder.py::test_a_transcoder_recovers_a_sparse_map_that_an_sae_of_its_input_cannot_predict",)),
]


def copy_project(dest: Path) -> None:
    """The project's tracked and untracked files (not what .gitignore leaves out: venvs, the store)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())


def run(mutation: Mutation, python: str) -> tuple[str, float, str]:
    """('caught' | 'SURVIVED' | 'DOES NOT APPLY', seconds, detail)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutation-{mutation.name}-") as tmp:
        copy = Path(tmp)
        copy_project(copy)
        target = copy / mutation.path
        text = target.read_text()
        if text.count(mutation.old) != 1:
            return "DOES NOT APPLY", 0.0, f"{mutation.path} has {text.count(mutation.old)} copies of the code to break"
        target.write_text(text.replace(mutation.old, mutation.new))
        proc = subprocess.run([python, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:randomly",
                               *mutation.tests], cwd=copy, capture_output=True, text=True)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        outcome = {0: "SURVIVED", 1: "caught"}.get(proc.returncode, f"tests could not run (exit {proc.returncode})")
        return outcome, time.perf_counter() - started, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated mutation names")
    parser.add_argument("--list", action="store_true", help="list the mutations and stop")
    options = parser.parse_args()
    chosen = MUTATIONS
    if options.only:
        wanted = set(options.only.split(","))
        unknown = wanted - {m.name for m in MUTATIONS}
        if unknown:
            print(f"error: no mutation named {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
            return 1
        chosen = [m for m in MUTATIONS if m.name in wanted]
    if options.list:
        for m in chosen:
            print(f"{m.name:34} {m.promise}  [{m.path}; {' '.join(m.tests)}]")
        return 0
    failures = 0
    for i, mutation in enumerate(chosen, 1):
        outcome, seconds, detail = run(mutation, sys.executable)
        failures += outcome != "caught"
        print(f"[{i}/{len(chosen)}] {outcome:8} {mutation.name:34} {seconds:5.0f} s  {detail}", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} mutations caught")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
