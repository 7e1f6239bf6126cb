"""SynthSAEBench's generator and scorer (sae_lens.synthetic) for bench/bench_ground_truth.py; run inside bench/.venv-saelens.

    bench/.venv-saelens/bin/python bench/peers/saelens_synth.py make '<json spec>'
    bench/.venv-saelens/bin/python bench/peers/saelens_synth.py score '<json spec>'

make: builds a SyntheticModel with SynthSAEBench-16k's recipe (SAELens docs/synth_sae_bench.md: Zipfian firing,
a hierarchy of mutually exclusive children scaled by their parent, low-rank correlation, varying magnitudes,
orthogonalised features, a bias) at the size the spec gives (features, hidden dim, hierarchy roots), saves it,
and samples the training rows (.npy, [rows, d]) and the evaluation rows (their true feature activations, kept
sparse, safetensors). Prints one JSON line: the true L0 overall and over the most frequent `width` features.

score: loads every SAE folder of the spec with SAE.load_from_disk and scores it with SynthSAEBench's own
eval_sae_on_synthetic_data on the evaluation rows, replayed in the same order for every SAE (the function
draws from a generator; a replay of the stored rows stands in for it). Prints one JSON line: each folder's
SyntheticDataEvalResult, as a dict.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
from sae_lens.synthetic import (FoldedNormalMagnitudeConfig, HierarchyConfig, LinearMagnitudeConfig,
                                LowRankCorrelationConfig, OrthogonalizationConfig, SyntheticModel, SyntheticModelConfig,
                                ZipfianFiringProbabilityConfig, eval_sae_on_synthetic_data)

SAMPLE_CHUNK = 10_000  # rows drawn per call: the generator's dense [chunk, n_features] stays small


def make(spec: dict) -> dict:
    cfg = SyntheticModelConfig(
        num_features=spec["features"], hidden_dim=spec["d"],
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(total_root_nodes=spec["roots"], branching_factor=4, max_depth=3,
                                  mutually_exclusive_portion=1.0, mutually_exclusive_min_depth=0,
                                  compensate_probabilities=True, scale_children_by_parent=True),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5), bias=0.5, seed=spec["seed"])
    started = time.perf_counter()
    model = SyntheticModel(cfg)
    out = Path(spec["out"])
    model.save(out / "model")
    torch.manual_seed(spec["seed"])
    rows, fires, top_fires = [], 0.0, 0.0
    for start in range(0, spec["rows"], SAMPLE_CHUNK):
        x, acts = model.sample_with_features(min(SAMPLE_CHUNK, spec["rows"] - start))
        rows.append(x.numpy())
        fires += float((acts > 0).sum())
        top_fires += float((acts[:, :spec["width"]] > 0).sum())
    np.save(out / "train_rows.npy", np.concatenate(rows).astype(np.float32))
    held = [model.activation_generator.sample(min(SAMPLE_CHUNK, spec["eval_rows"] - start))
            for start in range(0, spec["eval_rows"], SAMPLE_CHUNK)]
    sparse = torch.cat(held).to_sparse_coo().coalesce()
    save_file({"indices": sparse.indices().contiguous(), "values": sparse.values().contiguous(),
               "shape": torch.tensor(sparse.shape), "feature_vectors": model.feature_dict.feature_vectors.data,
               "bias": model.feature_dict.bias.data}, str(out / "eval.safetensors"))
    return {"true_l0": fires / spec["rows"], "true_l0_top_width": top_fires / spec["rows"],
            "seconds": time.perf_counter() - started, "config": cfg.to_dict()}


class _Replay:
    """Stands in for the ActivationGenerator: hands out the stored evaluation rows in order."""

    def __init__(self, acts: torch.Tensor):
        self.acts, self.next = acts, 0

    def sample(self, n: int) -> torch.Tensor:
        chunk = self.acts[self.next:self.next + n]
        self.next += n
        return chunk


def score(spec: dict) -> dict:
    model = SyntheticModel.load_from_disk(Path(spec["data"]) / "model")
    stored = load_file(str(Path(spec["data"]) / "eval.safetensors"))
    acts = torch.sparse_coo_tensor(stored["indices"], stored["values"], tuple(stored["shape"].tolist()),
                                   check_invariants=True).to_dense()
    results = {}
    for name, folder in spec["saes"].items():
        sae = SAE.load_from_disk(folder)
        result = eval_sae_on_synthetic_data(sae, model.feature_dict, _Replay(acts), num_samples=acts.shape[0],
                                            batch_size=SAMPLE_CHUNK)
        results[name] = result.to_dict() | {"architecture_loaded": type(sae).__name__}
    return results


if __name__ == "__main__":
    command, spec = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps({"make": make, "score": score}[command](spec)))
