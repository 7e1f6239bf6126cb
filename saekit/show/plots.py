"""Figures for the analysis and concept stages: the training-visualisation utilities that mi_crow
lacks. Each function returns a matplotlib Figure and, given `save_to`, also writes it as a PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

sns.set_theme(style="whitegrid", context="notebook")


def _finish(fig, save_to: str | Path | None):
    fig.tight_layout()
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_to, dpi=110)
    return fig


def training_curves(history: Sequence[dict[str, Any]], k: int, n_latents: int, save_to=None):
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss (FVU + AuxK)")
    axes[0].plot(epochs, [h["heldout_fvu"] for h in history], "s-", label="held-out FVU")
    axes[0].set(title="loss", xlabel="epoch")
    axes[0].legend()
    axes[1].plot(epochs, [h["heldout_r2"] for h in history], "o-", color="tab:green")
    axes[1].set(title="held-out R² = 1 − FVU", xlabel="epoch", ylim=(min(0, min(h["heldout_r2"] for h in history)), 1))
    axes[2].plot(epochs, [h["heldout_l0"] for h in history], "o-", color="tab:purple", label="held-out L0")
    axes[2].axhline(k, color="grey", ls="--", label=f"TOP_K = {k}")
    # BatchTopK's L0 is k only on average, and off it while its threshold settles in the first epochs
    top = max(k * 1.3, 1.05 * max(h["heldout_l0"] for h in history))
    axes[2].set(title="L0 (active latents per token)", xlabel="epoch", ylim=(0, top))
    axes[2].legend()
    axes[3].plot(epochs, [100 * h["heldout_dead"] / n_latents for h in history], "o-", color="tab:red",
                 label="never fire on held-out")
    axes[3].plot(epochs, [100 * h["dead_in_window"] / n_latents for h in history], "s--", color="tab:orange",
                 label="dead in training window")
    axes[3].set(title="dead latents (%)", xlabel="epoch")
    axes[3].legend()
    return _finish(fig, save_to)


def l0_distribution(l0_per_token: np.ndarray, k: int | None, save_to=None):
    fig, ax = plt.subplots(figsize=(6, 3.4))
    values, counts = np.unique(l0_per_token, return_counts=True)
    ax.bar(values, counts / counts.sum(), color="tab:purple")
    if k is not None:  # a JumpReLU SAE made elsewhere has no k
        ax.axvline(k, color="grey", ls="--", label=f"TOP_K = {k}")
    ax.set(title=f"L0 per held-out token (mean {l0_per_token.mean():.2f})", xlabel="active latents", ylabel="share of tokens")
    ax.legend()
    return _finish(fig, save_to)


def weights_against_init(trained: dict[str, np.ndarray], init: dict[str, np.ndarray], save_to=None):
    fig, axes = plt.subplots(1, len(trained), figsize=(6 * len(trained), 3.4))
    for ax, name in zip(np.atleast_1d(axes), trained):
        lo, hi = np.percentile(np.concatenate([trained[name].ravel(), init[name].ravel()]), [0.1, 99.9])
        bins = np.linspace(lo, hi, 80)
        ax.hist(init[name].ravel(), bins=bins, alpha=0.6, density=True, label="initialisation")
        ax.hist(trained[name].ravel(), bins=bins, alpha=0.6, density=True, label="trained")
        # a transcoder's decoder starts at zero: its change is then measured against where it went
        change = np.linalg.norm(trained[name] - init[name]) / (np.linalg.norm(init[name]) or np.linalg.norm(trained[name]) or 1)
        ax.set(title=f"{name} values (relative change {change:.2f})", xlabel="weight", ylabel="density")
        ax.legend()
    return _finish(fig, save_to)


def decoder_geometry(W_dec: np.ndarray, W_enc: np.ndarray, max_latents: int = 4096, seed: int = 0, save_to=None):
    """Decoder and encoder row norms, and pairwise and nearest-neighbour cosine of decoder rows."""
    rng = np.random.default_rng(seed)
    rows = W_dec if len(W_dec) <= max_latents else W_dec[rng.choice(len(W_dec), max_latents, replace=False)]
    dec_norms, enc_norms = np.linalg.norm(W_dec, axis=1), np.linalg.norm(W_enc, axis=1)
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)  # a transcoder's may be zero
    cos = unit @ unit.T
    np.fill_diagonal(cos, np.nan)
    pairs = cos[np.triu_indices(len(cos), 1)]
    fig, axes = plt.subplots(1, 4, figsize=(20, 3.4))
    if np.allclose(dec_norms, 1, atol=1e-3):
        # an SAE's decoder rows are renormalised every step, so their histogram is one bar: the range shows it
        axes[0].hist(dec_norms, bins=40, range=(0.9, 1.1), color="tab:blue")
        axes[0].set(title=f"decoder row norms (unit by construction; max |1 − ‖·‖| {np.abs(dec_norms - 1).max():.1e})",
                    xlabel="‖W_dec[i]‖")
    else:  # a transcoder's are free: how much each latent writes
        axes[0].hist(dec_norms, bins=60, color="tab:blue")
        axes[0].set(title="decoder row norms (free: how much each latent writes)", xlabel="‖W_dec[i]‖")
    axes[1].hist(enc_norms, bins=60, color="tab:purple")
    axes[1].set(title="encoder row norms (the code scale)", xlabel="‖W_enc[i]‖")
    axes[2].hist(pairs, bins=120, color="tab:green", density=True)
    axes[2].set(title="pairwise decoder cosine similarity", xlabel="cos", yscale="log")
    axes[3].hist(np.nanmax(cos, axis=1), bins=60, color="tab:orange")
    axes[3].set(title="max cosine to any other latent", xlabel="cos")
    return _finish(fig, save_to)


def reconstruction_error(per_token_fvu: np.ndarray, save_to=None):
    fig, ax = plt.subplots(figsize=(7, 3.4))
    hi = np.percentile(per_token_fvu, 99.5)
    ax.hist(np.clip(per_token_fvu, 0, hi), bins=80, color="tab:red")
    ax.axvline(np.median(per_token_fvu), color="k", ls="--", label=f"median {np.median(per_token_fvu):.3f}")
    ax.set(title="per-token reconstruction error on held-out tokens", xlabel="‖x − x̂‖² / mean ‖x − x̄‖²", ylabel="tokens")
    ax.legend()
    return _finish(fig, save_to)


def latent_frequency(frequencies: np.ndarray, dense_threshold: float = 0.1, save_to=None):
    freq = np.asarray(frequencies)
    dead = int((freq == 0).sum())
    dense = int((freq > dense_threshold).sum())
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    live = np.log10(freq[freq > 0])
    ax.hist(live, bins=60, density=True, color="tab:blue", label=f"live latents ({len(live)})")
    ax.axvline(np.log10(dense_threshold), color="tab:red", ls="--", label=f"dense > {dense_threshold:.0%} ({dense})")
    ax.set(title=f"latent firing frequency on held-out tokens — {dead} dead (never fire)",
           xlabel="log10 firing frequency", ylabel="density")
    ax.legend()
    return _finish(fig, save_to)


def cross_entropy_bars(splice: dict[str, float], save_to=None):
    names = ["clean", "sae", "mean", "zero"]
    labels = ["clean", "SAE spliced", "mean-ablated", "zero-ablated"]
    values = [splice[f"ce_{n}"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    bars = ax.bar(labels, values, color=["tab:green", "tab:blue", "tab:orange", "tab:red"])
    ax.bar_label(bars, fmt="%.3f")
    ax.set(title=f"next-token CE (nats); recovered vs mean-ablation {splice['ce_recovered_vs_mean']:.1%}",
           ylim=(min(values) * 0.95, max(values) * 1.03))
    return _finish(fig, save_to)


def frontier(points: Sequence[dict[str, Any]], l0: float, delta_ce: float, save_to=None):
    """ΔCE against L0: each trainer's measured points (saekit.evaluation.verdict.load_frontier), and this SAE."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    by_trainer: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_trainer.setdefault(p["trainer"], []).append(p)
    for trainer, pts in sorted(by_trainer.items()):
        pts = sorted(pts, key=lambda p: p["l0"])
        ax.plot([p["l0"] for p in pts], [p["delta_ce"] for p in pts], "o-" if len(pts) > 1 else "o", label=trainer)
    ax.plot([l0], [delta_ce], "*", color="black", markersize=16, label="this SAE")
    ax.set(xscale="log", xlabel="L0 (active latents per token)", ylabel="ΔCE (nats), lower is better",
           title="where this SAE sits on the measured frontier")
    ax.legend(fontsize=7, loc="upper right")
    return _finish(fig, save_to)


def sweep_frontier(rows: Sequence[dict[str, Any]], chosen: str, save_to=None):
    """A sweep's SAEs (saekit.evaluation.sweep.compare_sweep): ΔCE with its 95% interval, and held-out FVU,
    against L0; the chosen one circled, the ones that fail the verdict hollow."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for r in rows:
        face = None if r["verdict"] == "PASS" else "none"
        low, high = r["delta_ce_ci95"]
        line = axes[0].errorbar([r["l0"]], [r["delta_ce"]], yerr=[[r["delta_ce"] - low], [high - r["delta_ce"]]],
                                fmt="o", capsize=3, label=r["name"], mfc=face)
        axes[1].plot([r["l0"]], [r["fvu"]], "o", color=line[0].get_color(), mfc=face)
        for ax, y in ((axes[0], r["delta_ce"]), (axes[1], r["fvu"])):
            ax.annotate(r["name"], (r["l0"], y), fontsize=7, xytext=(4, 4), textcoords="offset points")
            if r["name"] == chosen:
                ax.plot([r["l0"]], [y], "o", ms=16, mfc="none", mec="black")
    axes[0].set(xscale="log", xlabel="held-out L0", ylabel="ΔCE (nats), lower is better",
                title="ΔCE with its 95% interval over texts")
    axes[1].set(xscale="log", xlabel="held-out L0", ylabel="held-out FVU, lower is better", title="FVU")
    axes[0].legend(fontsize=7, title=f"circled: {chosen}; hollow: FAIL", title_fontsize=7)
    return _finish(fig, save_to)


def most_active_latents(frequencies: np.ndarray, labels: dict[int, str] | None = None, top: int = 20, save_to=None):
    freq = np.asarray(frequencies)
    order = np.argsort(-freq)[:top]
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    axes[0].hist(freq[freq > 0], bins=60, color="tab:blue", log=True)
    axes[0].set(title="firing frequency of live latents", xlabel="share of tokens", ylabel="latents (log)")
    names = [f"{i}: {labels.get(int(i), '')}"[:38] if labels else str(i) for i in order]
    axes[1].barh(range(len(order))[::-1], freq[order], color="tab:green")
    axes[1].set_yticks(range(len(order))[::-1], names, fontsize=8)
    axes[1].set(title=f"top {top} latents by firing frequency", xlabel="share of tokens")
    return _finish(fig, save_to)


def peak_tokens(rows: Sequence[dict[str, Any]], save_to=None):
    """The tokens that most often carry a latent's peak (rows of saekit.show.dashboard.peak_tokens)."""
    tokens = [repr(r["token"]) for r in rows][::-1]  # repr shows a token's leading space
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.28 * len(rows) + 1.4), sharey=True)
    axes[0].barh(tokens, [r["examples"] for r in rows][::-1], color="tab:blue")
    axes[0].set(title="peak token of top examples", xlabel="examples")
    axes[1].barh(tokens, [r["mean_score"] for r in rows][::-1], color="tab:orange")
    axes[1].set(title="mean score at that peak", xlabel="activation")
    axes[0].tick_params(axis="y", labelsize=8)
    return _finish(fig, save_to)


def sparse_probing(results: dict[str, dict[str, Any]], save_to=None):
    """Balanced accuracy against k per kept task (saekit.evaluation.probing), one line per SAE (`results`: name ->
    its probing result, all on the same tasks), with the two SAE-free readouts: the lexical probe on the
    same k (dashed) and the dense probe on all d raw dimensions (dotted, the issue's ceiling)."""
    first = next(iter(results.values()))
    tasks = first.get("tasks") or []
    if not tasks:
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, first.get("skipped") or "sparse probing: no task kept", ha="center", va="center", wrap=True)
        return _finish(fig, save_to)
    ks = [str(k) for k in first["ks"]]
    panels = [("mean over kept tasks", {n: r["mean"] for n, r in results.items()}, first["mean_lexical"],
               first["mean_dense"], None)]
    panels += [(t["task"], {n: r["tasks"][i]["accuracy"] for n, r in results.items()}, t["lexical"], t["dense"],
                t["test_positives"]) for i, t in enumerate(tasks)]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax, (title, by_sae, lexical, dense, positives) in zip(axes.flat, panels):
        for name, accuracy in by_sae.items():
            ax.plot(ks, [accuracy[k] for k in ks], "o-", label=name)
        ax.plot(ks, [lexical[k] for k in ks], "s--", color="grey", label="lexical (bag of tokens)")
        ax.axhline(dense, color="black", ls=":", label="dense probe, all d dims")
        ax.axhline(0.5, color="tab:red", lw=0.8, alpha=0.5)
        ax.set(title=title + (f" ({positives} pos.)" if positives is not None else ""), xlabel="k latents",
               ylim=(0.3, 1.02))
        ax.title.set_fontsize(9)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("balanced accuracy (test)")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    return _finish(fig, save_to)
