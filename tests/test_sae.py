import pytest
import torch

from saekit import sae as sae_module
from saekit.sae import SAEFileError, TopKSAE


def _sae(d=12, n=40, k=5, seed=0):
    torch.manual_seed(seed)
    sae = TopKSAE(d, n, k)
    sae.init_weights(torch.randn(d) * 0.1, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae


def _dense_reference(sae, x):
    pre = sae.pre_activations(x)
    top = pre.topk(sae.k, dim=-1)
    codes = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    return codes @ sae.W_dec + sae.b_dec


@pytest.mark.parametrize("sparse_kernels", [True, False], ids=["cpu-sparse-products", "gather-index-add"])
def test_sparse_path_equals_the_dense_definition_in_value_and_gradient(sparse_kernels, monkeypatch):
    monkeypatch.setattr(sae_module, "_sparse_kernels", lambda t: sparse_kernels)
    sae = _sae()
    x = torch.randn(64, 12)
    out = sae(x)
    ref_sae = _sae()
    ref = _dense_reference(ref_sae, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(ref_sae, name).grad, rtol=1e-4, atol=1e-5)


def test_exactly_k_latents_and_dense_codes():
    sae = _sae()
    x = torch.randn(30, 12)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (30, 5)
    codes = sae.dense_codes(x)
    assert ((codes > 0).sum(1) <= 5).all() and torch.allclose(codes.gather(1, indices), values)


def test_decoder_gradient_projection_keeps_rows_on_the_sphere():
    sae = _sae()
    sae(torch.randn(16, 12)).sum().backward()
    sae.project_decoder_grad()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(40), atol=1e-5)
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(40))


def test_folding_the_input_scale_gives_the_same_reconstruction_of_raw_inputs():
    sae = _sae().eval()
    x = torch.randn(50, 12) * 7
    scale = 0.125
    with torch.no_grad():
        expected = sae(x * scale) / scale
        expected_latents = sae.encode(x * scale)
        sae.fold_input_scale(scale)
        torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)
        values, indices = sae.encode(x)
    assert torch.equal(indices.sort(1).values, expected_latents[1].sort(1).values)
    torch.testing.assert_close(values.sort(1).values, expected_latents[0].sort(1).values / scale)


def test_a_reloaded_sae_reproduces_its_reconstructions_exactly(tmp_path):
    sae = _sae().eval()
    x = torch.randn(20, 12)
    saved_id = sae.save(tmp_path / "sae.pt", layer_signature="L", model_id="m")
    loaded, meta = TopKSAE.load(tmp_path / "sae.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), sae(x))
    assert meta == {"layer_signature": "L", "model_id": "m", "sae_id": saved_id} and loaded.k == 5


def test_load_errors_say_what_to_run(tmp_path):
    with pytest.raises(SAEFileError, match="Run stage 02"):
        TopKSAE.load(tmp_path / "missing.pt")
    torch.save({"something": "else"}, tmp_path / "other.pt")
    with pytest.raises(SAEFileError, match="not an SAE saved by this version of the project"):
        TopKSAE.load(tmp_path / "other.pt")


def test_k_out_of_range():
    with pytest.raises(ValueError, match="TOP_K must be between 1 and n_latents"):
        TopKSAE(4, 8, 9)
