"""The SAELens-format export and loader. The round trip through SAELens itself runs in the peer venv
that `make saelens-venv` creates (bench/.venv-saelens; CI builds it), and is skipped where it is absent."""
import json
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, SAELENS_PYTHON, copy_store, require_saelens_venv, run_python, saelens_forward
from saekit.training.sae import BatchTopKSAE, MatryoshkaSAE, TopKSAE
from saekit.training.saelens_format import CFG_FILE, SEAL_FILE, WEIGHTS_FILE, SAELensFormatError, load_saelens, save_saelens

def _trained_looking_sae(d=12, n=40, k=5, seed=0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, n, k)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(n, d, generator=g))
        sae.W_dec.copy_(torch.randn(n, d, generator=g) / d ** 0.5)
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(d, generator=g))
    return sae.eval()


def _as_batchtopk(sae: TopKSAE) -> BatchTopKSAE:
    """The same weights as a BatchTopK SAE, with a different threshold for each latent."""
    batchtopk = BatchTopKSAE(sae.d_in, sae.n_latents, sae.k)
    batchtopk.load_state_dict(sae.state_dict(), strict=False)
    with torch.no_grad():
        batchtopk.threshold.copy_(torch.linspace(0.1, 1.0, sae.n_latents))
    return batchtopk.eval()


def _saelens_reference(cfg: dict, weights: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens 6's TopK forward written out densely (sae_lens/saes/topk_sae.py), for comparison."""
    sae_in = x - weights["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ weights["W_enc"] + weights["b_enc"]
    norms = weights["W_dec"].norm(dim=1)
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * norms
    top = pre.topk(cfg["k"], dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    if cfg.get("rescale_acts_by_decoder_norm"):
        codes = codes / norms
    return codes @ weights["W_dec"] + weights["b_dec"]


def test_export_and_load_reproduce_the_reconstruction(tmp_path):
    sae = _trained_looking_sae()
    folder = save_saelens(sae, tmp_path / "saelens", "some/model", "some_layer", {"activation_run_id": "r1"})
    assert sorted(p.name for p in folder.iterdir()) == sorted([CFG_FILE, WEIGHTS_FILE, SEAL_FILE])
    cfg = json.loads((folder / CFG_FILE).read_text())
    assert cfg["architecture"] == "topk" and (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (12, 40, 5)
    assert cfg["metadata"]["hook_name"] == "some_layer" and cfg["metadata"]["activation_run_id"] == "r1"

    x = torch.randn(200, 12)
    with torch.no_grad():
        expected = sae(x)
        torch.testing.assert_close(_saelens_reference(cfg, load_file(folder / WEIGHTS_FILE), x), expected)
        loaded, loaded_cfg = load_saelens(folder)
        assert torch.equal(loaded(x), expected) and loaded_cfg == cfg


def test_a_batchtopk_sae_is_exported_as_a_jumprelu_and_loads_back_as_one(tmp_path):
    sae = _trained_looking_sae()
    batchtopk = _as_batchtopk(sae)
    folder = save_saelens(batchtopk, tmp_path / "s", "m", "h")
    cfg = json.loads((folder / CFG_FILE).read_text())
    weights = load_file(folder / WEIGHTS_FILE)
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["k"] == 5 and "k" not in cfg
    x = torch.randn(64, 12)
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]  # SAELens's JumpReLU, written out
    expected = (pre.relu() * (pre > weights["threshold"])) @ weights["W_dec"] + weights["b_dec"]
    loaded, _ = load_saelens(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), batchtopk(x), rtol=1e-5, atol=1e-5)
    assert type(loaded) is BatchTopKSAE and loaded.k == 5
    del cfg["metadata"]["k"]  # a JumpReLU SAE from elsewhere has no k
    (folder / CFG_FILE).write_text(json.dumps(cfg))
    assert load_saelens(folder)[0].k is None


def test_saving_again_replaces_the_folder_whole(tmp_path):
    save_saelens(_trained_looking_sae(seed=0), tmp_path / "saelens", "m", "h")
    second = _trained_looking_sae(seed=1)
    save_saelens(second, tmp_path / "saelens", "m", "h")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saelens"]
    assert torch.equal(load_saelens(tmp_path / "saelens")[0].W_enc, second.W_enc)


@pytest.mark.parametrize("rescale, apply_b_dec", [(True, True), (False, False), (True, False)])
def test_options_saelens_applies_at_run_time_are_folded_into_the_weights(tmp_path, rescale, apply_b_dec):
    g = torch.Generator().manual_seed(3)
    weights = {"W_enc": torch.randn(12, 40, generator=g), "b_enc": torch.randn(40, generator=g),
               "W_dec": torch.randn(40, 12, generator=g) * 3, "b_dec": torch.randn(12, generator=g)}
    cfg = {"architecture": "topk", "d_in": 12, "d_sae": 40, "k": 6, "dtype": "float32",
           "apply_b_dec_to_input": apply_b_dec, "rescale_acts_by_decoder_norm": rescale,
           "normalize_activations": "none", "metadata": {"sae_lens_version": "6.54.12"}}
    save_file(weights, str(tmp_path / WEIGHTS_FILE))
    (tmp_path / CFG_FILE).write_text(json.dumps(cfg))
    x = torch.randn(300, 12)
    with torch.no_grad():
        torch.testing.assert_close(load_saelens(tmp_path)[0](x), _saelens_reference(cfg, weights, x),
                                   rtol=1e-4, atol=1e-4)


def test_what_it_cannot_read_is_refused_with_a_reason(tmp_path):
    with pytest.raises(SAELensFormatError, match="needs cfg.json"):
        load_saelens(tmp_path)
    folder = save_saelens(_trained_looking_sae(), tmp_path / "s", "m", "h")
    cfg = json.loads((folder / CFG_FILE).read_text())
    (folder / CFG_FILE).write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SAELensFormatError, match="TopK and JumpReLU \\(BatchTopK\\) SAEs only"):
        load_saelens(folder)
    (folder / CFG_FILE).write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(SAELensFormatError, match="lacks threshold"):
        load_saelens(folder)
    (folder / CFG_FILE).write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(SAELensFormatError, match="normalises its inputs"):
        load_saelens(folder)
    (folder / CFG_FILE).write_text(json.dumps(cfg))
    (folder / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(SAELensFormatError, match="not a readable safetensors"):
        load_saelens(folder)


def test_saelens_loads_the_export_and_we_load_saelens_own_files(tmp_path):
    """Both directions, in SAELens itself: SAE.load_from_disk on our exports (TopK, and BatchTopK as a
    JumpReLU) reconstructs as we do, and a TopK SAE that SAELens saves (decoder-norm rescaling on) loads here with its reconstruction."""
    require_saelens_venv()
    sae = _trained_looking_sae()
    save_saelens(sae, tmp_path / "ours", "m", "h")
    batchtopk = _as_batchtopk(sae)
    save_saelens(batchtopk, tmp_path / "ours_batchtopk", "m", "h")
    x = torch.randn(256, 12)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file, save_file
        from sae_lens import SAE
        from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
        x = load_file({str(tmp_path / "x.safetensors")!r})["x"]
        ours = SAE.load_from_disk({str(tmp_path / "ours")!r})
        ours_batchtopk = SAE.load_from_disk({str(tmp_path / "ours_batchtopk")!r})
        torch.manual_seed(0)
        theirs = TopKSAE(TopKSAEConfig(d_in=12, d_sae=40, k=5, rescale_acts_by_decoder_norm=True))
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_()
            theirs.W_dec.mul_(2.5)
            theirs.save_model({str(tmp_path / "theirs")!r})
            save_file({{"ours": ours(x), "theirs": theirs(x), "ours_batchtopk": ours_batchtopk(x)}},
                      {str(tmp_path / "out.safetensors")!r})
        print(type(ours_batchtopk).__name__, type(ours).__name__)
    """)
    proc = subprocess.run([str(SAELENS_PYTHON), "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["JumpReLUSAE", "TopKSAE"]
    out = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(out["ours"], sae(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["ours_batchtopk"], batchtopk(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_saelens(tmp_path / "theirs")[0](x), out["theirs"], rtol=1e-4, atol=1e-4)


def test_saelens_loads_a_matryoshka_export_as_the_jumprelu_it_is_at_inference(tmp_path):
    """A Matryoshka SAE is saved as SAELens saves its own (a JumpReLU at the learned threshold):
    SAE.load_from_disk reconstructs as we do, and the folder loads back here with that reconstruction."""
    require_saelens_venv()
    sae = _trained_looking_sae()
    matryoshka = MatryoshkaSAE(sae.d_in, sae.n_latents, sae.k, prefix_ends=(4, 12, 40))
    matryoshka.load_state_dict(_as_batchtopk(sae).state_dict())
    matryoshka.eval()
    save_saelens(matryoshka, tmp_path / "ours", "m", "h")
    assert json.loads((tmp_path / "ours" / CFG_FILE).read_text())["metadata"]["trained_architecture"] == "matryoshka"
    x = torch.randn(256, 12)
    loaded_as, out = saelens_forward(tmp_path / "ours", x, tmp_path)
    assert loaded_as == "JumpReLUSAE"
    with torch.no_grad():
        expected = matryoshka(x)
        assert (matryoshka.dense_codes(x) > 0).sum(1).float().mean() > 1  # the threshold leaves codes to compare
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_saelens(tmp_path / "ours")[0](x), expected, rtol=1e-5, atol=1e-5)


def test_stage_02_writes_its_sae_in_saelens_format_and_stages_03_to_05_can_read_either(smoke_args):
    from saekit.base.settings import load_settings
    from saekit.training.saelens_format import load_sae

    settings = load_settings(smoke_args)
    ours, meta = load_sae(settings)
    folder = settings.store / "sae_model" / "saelens"
    exported, exported_meta = load_sae(load_settings(smoke_args + [f"--SAE_PATH={folder}"]))
    x = torch.randn(64, ours.d_in)
    with torch.no_grad():
        assert torch.equal(exported(x), ours(x))
    assert meta["source"] == "stage 02" and exported_meta["source"].startswith(f"{folder}, sealed")
    assert exported_meta["saelens_metadata"]["sae_id"] == meta["sae_id"]
    assert (exported_meta["model_id"], exported_meta["layer_signature"]) == (meta["model_id"], meta["layer_signature"])


def test_sae_path_must_name_a_saelens_folder(tmp_path):
    from saekit.base.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="SAE_PATH"):
        load_settings([f"--SAE_PATH={tmp_path}"])


def test_stage_03_analyses_an_sae_from_sae_path_without_history_or_initialisation(smoke_args):
    from saekit.base.settings import load_settings
    from saekit.evaluation import analysis

    settings = load_settings(smoke_args)
    own = analysis.load_trained_sae(settings)
    folder = settings.store / "sae_model" / "saelens"
    other = analysis.load_trained_sae(load_settings(smoke_args + [f"--SAE_PATH={folder}"]))
    assert other.history is None and analysis.weight_report(other) is None
    assert other.heldout_start == own.heldout_start and other.run.run_id == own.run.run_id
    assert analysis.heldout_tokens(other)["summary"] == analysis.heldout_tokens(own)["summary"]


def test_stage_04_finds_concepts_of_an_sae_from_sae_path(tmp_path, smoke_args):
    from saekit.base.settings import load_settings
    from saekit.concepts.exports import open_concepts
    from saekit.training.saelens_format import load_sae

    store = tmp_path / "store"
    args = copy_store(smoke_args, store, "concepts*") + [f"--SAE_PATH={store / 'sae_model' / 'saelens'}"]
    proc = run_python(["-m", "saekit.concepts.runner", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, meta = load_sae(load_settings(args))
    concepts, _, _ = open_concepts(store, meta["sae_id"])  # the set names the SAE_PATH SAE, not stage 02's
    assert concepts["meta"]["sae_id"] == meta["sae_id"] and concepts["latents"]


def test_stage_03_analyses_a_jumprelu_sae_without_k_from_sae_path(tmp_path, smoke_args):
    """A JumpReLU SAE from elsewhere (SAELens's BatchTopK, Gemma Scope) has thresholds and no k: stage 03
    measures it, plots its L0 and judges it without the L0 check."""
    from saekit.base.settings import load_settings
    from saekit.evaluation import analysis, verdict
    from saekit.show import plots

    settings = load_settings(smoke_args)
    own = analysis.load_trained_sae(settings)
    jumprelu = BatchTopKSAE(own.sae.d_in, own.sae.n_latents, None)
    jumprelu.load_state_dict(own.sae.state_dict(), strict=False)
    with torch.no_grad():
        jumprelu.threshold.fill_(float(own.sae.b_enc.abs().mean()))
    folder = save_saelens(jumprelu.eval(), tmp_path / "jumprelu", settings.MODEL_ID, settings.LAYER_SIGNATURE)
    other = analysis.load_trained_sae(load_settings(smoke_args + [f"--SAE_PATH={folder}"]))
    assert type(other.sae) is BatchTopKSAE and other.sae.k is None and other.history is None
    heldout = analysis.heldout_tokens(other)
    assert heldout["summary"]["l0"] > 0 and heldout["l0_per_token"].max() > heldout["l0_per_token"].min()
    plots.l0_distribution(heldout["l0_per_token"], other.sae.k)
    splice = {"eval_texts_in_training": 0, "delta_ce": 0.03, "ce_recovered_vs_mean": 0.8, "ce_clean": 2.0, "ce_mean": 2.15}
    names = [c["check"] for c in verdict.checks(settings, other.sae.k, heldout["summary"], None, splice,
                                                 other.sae.architecture)]
    assert "held-out FVU" in names and not any("L0" in name for name in names)


def _as_from_elsewhere(own: Path, folder: Path, **cfg_metadata) -> Path:
    """Stage 02's SAELens folder as SAELens or a download would give it: no seal, other metadata."""
    import shutil

    shutil.copytree(own, folder)
    (folder / SEAL_FILE).unlink()
    cfg = json.loads((folder / CFG_FILE).read_text())
    cfg["metadata"] = {key: value for key, value in cfg["metadata"].items()
                       if key in ("sae_lens_version", "model_name", "hook_name")} | cfg_metadata
    (folder / CFG_FILE).write_text(json.dumps(cfg))
    return folder


def test_stage_02s_saelens_folder_names_the_real_model_and_a_saelens_hook_readable_by_all(smoke_args):
    import stat

    from saekit.activations.models import EMBEDDED_HUB_ID, public_model_id
    from saekit.base.settings import load_settings
    from saekit.training.saelens_format import saelens_hook_name

    settings = load_settings(smoke_args)
    folder = settings.store / "sae_model" / "saelens"
    metadata = json.loads((folder / CFG_FILE).read_text())["metadata"]
    assert metadata["hook_name"] == "model.layers.1.post_attention_layernorm"  # the transformers module path
    assert metadata["model_name"] == public_model_id(settings.MODEL_ID)
    assert public_model_id("embedded") == EMBEDDED_HUB_ID
    assert saelens_hook_name("llamaforcausallm_model_layers_15") == "blocks.15.hook_resid_post"
    for path in folder.iterdir():  # as every other file of the store, under the usual umask
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask(), path


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("metadata,says", [
    ({"hook_name": "blocks.0.hook_resid_post"}, "set --LAYER_SIGNATURE=llamaforcausallm_model_layers_0 "),
    ({"hook_name": "model.layers.2.post_attention_layernorm"},
     "set --LAYER_SIGNATURE=llamaforcausallm_model_layers_2_post_attention_layernorm "),
    ({"hook_name": "blocks.1.ln2.hook_normalized"}, "not a hook this project can place"),
    ({"model_name": "gpt2-small"}, "trained on model 'gpt2-small' (cfg.json's model_name) but MODEL_ID is"),
])
def test_an_sae_from_elsewhere_for_another_layer_or_model_is_refused(tmp_path, smoke_args, metadata, says):
    from saekit.base.settings import load_settings
    from saekit.training.saelens_format import load_sae

    settings = load_settings(smoke_args)
    folder = _as_from_elsewhere(settings.store / "sae_model" / "saelens", tmp_path / "theirs", **metadata)
    with pytest.raises(SAELensFormatError, match=re.escape(says)):
        load_sae(load_settings(smoke_args + [f"--SAE_PATH={folder}"]))


def test_an_sae_from_elsewhere_at_the_right_layer_loads_and_says_it_has_no_seal(tmp_path, smoke_args):
    from saekit.base.settings import load_settings
    from saekit.training.saelens_format import load_sae

    settings = load_settings(smoke_args)
    folder = _as_from_elsewhere(settings.store / "sae_model" / "saelens", tmp_path / "theirs")
    _, meta = load_sae(load_settings(smoke_args + [f"--SAE_PATH={folder}"]))
    assert meta["sealed"] is False and "from elsewhere: it has no seal" in meta["source"]


def test_the_projects_own_saelens_folder_is_sealed_and_checked_when_read_back(tmp_path, smoke_args):
    import shutil

    from saekit.base.integrity import IntegrityError
    from saekit.base.settings import load_settings
    from saekit.training.saelens_format import load_sae

    own = load_settings(smoke_args).store / "sae_model" / "saelens"
    folder = tmp_path / "copy"
    shutil.copytree(own, folder)
    args = smoke_args + [f"--SAE_PATH={folder}"]
    assert load_sae(load_settings(args))[1]["sealed"] is True
    weights = folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one flipped bit of a weight: still a readable file, a different SAE
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sae_weights.safetensors is corrupt"):
        load_sae(load_settings(args))
    (folder / SEAL_FILE).unlink()
    with pytest.raises(SAELensFormatError, match="saekit_seal.json is missing"):
        load_sae(load_settings(args))


def test_the_readme_own_code_snippet_runs_on_a_trained_store(smoke_args):
    """README.md's "The package" snippet, as written, on the smoke store: the only change is the
    settings it loads (the smoke run's instead of config.py's defaults) and the rows it is given."""
    import re

    from conftest import store_of
    from saekit.activations.store import open_run

    section = (ROOT / "README.md").read_text().split("## The package", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "load_settings([])" in snippet
    run = open_run(store_of(smoke_args))
    rows = torch.from_numpy(run.rows(0, 5))
    scope = {"rows": rows}
    exec(snippet.replace("load_settings([])", f"load_settings({smoke_args!r})"), scope)  # the README's own text
    assert scope["meta"]["layer_signature"] == run.meta["layer_signature"]
    assert scope["x_hat"].shape == rows.shape and (scope["values"] != 0).sum(1).le(scope["sae"].k).all()
