import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saekit.training import kernels
from saekit.training.sae import BatchTopKSAE, MatryoshkaSAE, SAEFileError, TopKSAE, matryoshka_prefix_ends


def _sae(d=12, n=40, k=5, seed=0, architecture=TopKSAE, **layout):
    torch.manual_seed(seed)
    sae = architecture(d, n, k, **layout)
    sae.init_weights(torch.randn(d) * 0.1, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae


def _dense_reference(sae, x):
    pre = sae.pre_activations(x)
    top = pre.topk(sae.k, dim=-1)
    codes = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    return codes @ sae.W_dec + sae.b_dec


# the three ways a step multiplies through its codes: KERNELS="sparse" on a CPU and on a GPU, and "dense"
KERNEL_PATHS = {"cpu-sparse-products": ("sparse", True), "gather-index-add": ("sparse", False), "dense": ("dense", True)}


def _use_kernels(path, sae, monkeypatch):
    kind, sparse_products = KERNEL_PATHS[path]
    monkeypatch.setattr(kernels, "_sparse_products", lambda t: sparse_products)
    sae.kernels = kind
    return sae


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_sparse_path_equals_the_dense_definition_in_value_and_gradient(path, monkeypatch):
    """Every kernel path gives the dense autograd definition's values and gradients, in float32,
    within rtol 1e-4 (the tolerance docs/scale.md states for KERNELS)."""
    sae = _use_kernels(path, _sae(), monkeypatch)
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


def _batchtopk():
    return _sae(k=3, architecture=BatchTopKSAE)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_batchtopk_trains_on_the_batch_top_k_times_batch_and_matches_its_dense_definition(path, monkeypatch):
    sae, ref_sae = _use_kernels(path, _batchtopk(), monkeypatch), _batchtopk()
    x = torch.randn(64, 12)
    x[0] *= 30  # an outlier token (as BOS often is) is owed more latents than its first 4k candidates
    codes = sae.train().codes(x)
    values, _ = codes.padded()
    assert int((values > 0).sum()) == 3 * 64  # k per token on average: the batch's budget, not each row's
    assert int((values[0] > 0).sum()) > 4 * 3 and len(set((values > 0).sum(1).tolist())) > 2
    out = sae.decode_codes(codes)
    pre = ref_sae.pre_activations(x).flatten()  # ReLU'd pre-activations of every latent
    kept = torch.zeros_like(pre).scatter(0, pre.topk(3 * 64).indices, 1.0)
    ref = (pre * kept).view(64, 40) @ ref_sae.W_dec + ref_sae.b_dec
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(ref_sae, name).grad, rtol=1e-4, atol=1e-5)
    # the threshold starts at the first batch's smallest kept value, then averages the batches' values
    first = float(values.detach()[values > 0].min())
    torch.testing.assert_close(sae.threshold, torch.full((40,), first))
    with torch.no_grad():
        second_values, _ = sae.encode(torch.randn(64, 12))
    second = float(second_values[second_values > 0].min())
    torch.testing.assert_close(sae.threshold, torch.full((40,), (first + second) / 2))


def _widening_batch_top(pre: torch.Tensor, budget: int, k: int) -> torch.Tensor:
    """The selection BatchTopK made before its one flat top-k, kept as this test's oracle: each row's
    top 4k, widened while some row kept all of its own; returns the kept codes as a dense matrix."""
    codes, width = pre.relu(), min(4 * k, pre.shape[1])
    while True:
        top = codes.topk(width, dim=-1, sorted=False)
        flat = top.values.flatten()
        kept = torch.zeros_like(flat, dtype=torch.bool)
        kept[flat.topk(min(budget, len(flat)), sorted=False).indices] = True
        kept = kept.view_as(top.values) & (top.values > 0)
        if width == pre.shape[1] or not kept.all(1).any():
            return torch.zeros_like(codes).scatter(1, top.indices, top.values * kept)
        width = min(2 * width, pre.shape[1])


@pytest.mark.parametrize("case", ["plain", "outlier rows", "ties", "fewer positive than the budget"])
def test_batchtopk_selects_what_the_widening_per_row_top_selected(case):
    """One flat top-k over the batch keeps the codes the old widening per-row top kept: the same
    (row, latent) pairs where no two codes tie, and where they tie at the cut, as many of the tied
    value, so the same codes by value in each row's multiset but for which of the tied ones."""
    torch.manual_seed(1)
    batch, n, k = 64, 200, 4
    pre = torch.randn(batch, n)
    if case == "outlier rows":  # BOS-like rows, far larger than the rest, are owed most of the budget
        pre[[0, 17]] *= 50
    if case == "ties":
        pre = torch.randint(-4, 5, (batch, n)).float()
    if case == "fewer positive than the budget":
        pre = pre - 2.8
    flat = BatchTopKSAE._batch_top(pre, k * batch)
    codes = kernels.Codes.from_flat(pre.flatten()[flat].relu(), flat, batch, n)
    got = kernels.dense(codes, codes.values, n)
    expected = _widening_batch_top(pre, k * batch, k)
    assert len(flat) == k * batch and bool((flat.diff() > 0).all())
    assert torch.equal(codes.offsets, torch.searchsorted(codes.rows, torch.arange(batch + 1)))
    if case == "ties":
        torch.testing.assert_close(got.flatten().sort().values, expected.flatten().sort().values, rtol=0, atol=0)
        cut = got[got > 0].min()
        assert torch.equal(got > cut, expected > cut)  # only ties at the cut may differ in place
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if case == "outlier rows":
        assert int((got[0] > 0).sum()) > 4 * k  # the outliers took more than the old first width
    if case == "fewer positive than the budget":
        assert 0 < int((got > 0).sum()) < k * batch


def test_batchtopk_training_reads_nothing_back_to_the_host():
    """A BatchTopK step's choice and threshold stay on the device: no .item(), bool() or tolist() on a
    tensor (which, on a GPU, waits for every kernel queued before it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ReadBacks(TorchDispatchMode):
        seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
                ReadBacks.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    sae = _batchtopk().train()
    x = torch.randn(64, 12)
    x[0] *= 30
    with ReadBacks():
        sae.decode_codes(sae.codes(x)).pow(2).sum().backward()
    assert ReadBacks.seen == []


def test_batchtopk_inference_is_a_jumprelu_at_its_threshold():
    sae = _batchtopk().eval()
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(0.0, 0.4, 40))  # per latent, as a SAELens JumpReLU may have
        x = torch.randn(50, 12)
        pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        codes = pre.relu() * (pre > sae.threshold)
        torch.testing.assert_close(sae.dense_codes(x), codes)
        torch.testing.assert_close(sae(x), codes @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)
        values, _ = sae.encode(x)
        assert values.shape[1] == int((codes > 0).sum(1).max())  # as wide as the busiest token
        # the input scale folds into the threshold too
        expected = sae(x * 0.25) / 0.25
        sae.fold_input_scale(0.25)
        torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)


def test_a_reloaded_batchtopk_sae_keeps_its_architecture_and_threshold(tmp_path):
    sae = _batchtopk().eval()
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    sae.save(tmp_path / "sae.pt", layer_signature="L", model_id="m")
    loaded, _ = TopKSAE.load(tmp_path / "sae.pt")
    x = torch.randn(20, 12)
    assert type(loaded) is BatchTopKSAE and loaded.k == 3 and torch.equal(loaded.threshold, sae.threshold)
    with torch.no_grad():
        assert torch.equal(loaded(x), sae(x))


def test_a_bfloat16_selection_keeps_float32_values_and_gradients():
    """SELECT_DTYPE = bfloat16 only proposes the latents: the choice, the chosen values and every
    gradient are those of the float32 definition."""
    torch.manual_seed(0)
    sae = TopKSAE(48, 192, 6)
    sae.init_weights(torch.randn(48) * 0.1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    sae.select_dtype = torch.bfloat16
    x = torch.randn(64, 48)
    values, indices = sae.encode(x)
    loss = (sae.decode(values, indices) - x).pow(2).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}

    sae.zero_grad()
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc  # the float32 definition, dense autograd
    reference = torch.relu(pre.gather(1, indices))
    torch.testing.assert_close(values, reference, rtol=1e-5, atol=1e-6)
    (((reference.unsqueeze(2) * sae.W_dec[indices]).sum(1) + sae.b_dec - x).pow(2).sum()).backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # and the choice is float32's: bfloat16's top 2k re-scored in float32 hold float32's top k
    exact = pre.detach().topk(6, dim=-1).indices
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(indices, exact))


def _heap_in_use():
    """Bytes this process has taken from glibc's malloc (heap and mmapped blocks), or None elsewhere."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    return lambda: (lambda m: m.uordblks + m.hblkhd)(mallinfo2())


# (architecture, path, SELECT_DTYPE) x a shape each path's own tensors dominate: d, N_LATENTS_MULTIPLIER, k, batch
MEMORY_CASES = [(arch, path, select) for arch in ("topk", "batchtopk") for path in KERNEL_PATHS
                for select in ("float32", "bfloat16") if not (arch == "batchtopk" and select == "bfloat16")]
MEMORY_SHAPES = {"gather-index-add": (256, 1, 32, 128), "dense": (16, 128, 4, 256), "cpu-sparse-products": (64, 8, 8, 256)}


@pytest.mark.parametrize("arch, path, select", MEMORY_CASES)
def test_the_memory_check_counts_what_a_training_step_allocates(arch, path, select, monkeypatch):
    """A whole training step (encode, AuxK with most latents dead, backward, Adam) measured by the C
    heap on a CPU, with each kernel path forced, never takes more than the check counts for a step
    (saekit.base.memory.training_parts' products and saekit.training.kernels.step_parts), and where
    the check counts the GPU path's gathered rows, the step needs them: without them the count would
    fall short. (The dense kernels' matrices live while the encoder's product is gone: the step's
    products already cover them at this shape.)"""
    from saekit.base.memory import training_parts
    from saekit.training.train import TrainConfig, _Trainer, step_memory
    from saekit.base.distributed import World
    from saekit.base.settings import load_settings
    from dataclasses import replace

    in_use = _heap_in_use()
    if in_use is None:
        pytest.skip("needs glibc's mallinfo2 to read the heap")
    kind, sparse_products = KERNEL_PATHS[path]
    monkeypatch.setattr(kernels, "_sparse_products", lambda t: sparse_products)
    d, multiplier, k, batch = MEMORY_SHAPES[path]
    cfg = replace(TrainConfig.from_settings(load_settings([])), architecture=arch, n_latents_multiplier=multiplier, k=k,
                  batch_size=batch, select_dtype=select, kernels=kind, dead_window_tokens=1, warmup_steps=1)
    device = torch.device("cuda" if not sparse_products else "cpu")  # what the check counts for: the GPU's gathers
    trainer = _Trainer(cfg, d, 100 * batch, torch.device("cpu"), World())
    torch.manual_seed(0)
    rows = torch.randn(4 * batch, d)
    trainer.initialise(rows)
    for step in range(2):  # the first steps make Adam's state, the gradients and the dead latents
        trainer.step(rows[step * batch:(step + 1) * batch], step)
    assert len(trainer.dead_idx) > 0 or path == "gather-index-add"  # AuxK runs in the step (the gathers' shape fires all)

    class Peak(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, in_use())
            return out

    batch_rows = rows[2 * batch:3 * batch].clone()
    peak = Peak()
    peak.peak = before = in_use()
    with peak:
        trainer.step(batch_rows, 2)
    measured = peak.peak - before
    n = multiplier * d
    own = step_memory(cfg, d, device)
    counted = training_parts(d, n, batch, False)["a training step's products"] + sum(own.values())
    assert measured <= counted, (measured, counted, own)
    if path == "gather-index-add":
        assert measured > counted - own["a training step's gathered rows"], (measured, counted, own)


def _matryoshka():
    return _sae(k=3, architecture=MatryoshkaSAE, prefix_ends=(4, 10, 40))


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_matryoshka_prefixes_reconstruct_from_their_own_latents_as_the_dense_definition_does(path, monkeypatch):
    """Each prefix's reconstruction is the batch-top codes of latents [0, end) times their decoder
    rows, plus b_dec, in value and in the gradient of the prefixes' mean loss."""
    sae, ref_sae = _use_kernels(path, _matryoshka(), monkeypatch), _matryoshka()
    x = torch.randn(64, 12)
    reconstructions = sae.train().prefix_reconstructions(sae.codes(x))
    pre = ref_sae.pre_activations(x).flatten()
    codes = (pre * torch.zeros_like(pre).scatter(0, pre.topk(3 * 64).indices, 1.0)).view(64, 40)
    refs = [codes[:, :end] @ ref_sae.W_dec[:end] + ref_sae.b_dec for end in (4, 10, 40)]
    assert len(reconstructions) == 3
    for got, ref in zip(reconstructions, refs):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reconstructions[0], reconstructions[-1])  # the codes do reach past the first prefix
    torch.stack([(x - r).pow(2).sum() for r in reconstructions]).mean().backward()
    torch.stack([(x - r).pow(2).sum() for r in refs]).mean().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(ref_sae, name).grad, rtol=1e-4, atol=1e-5)


def test_topk_and_batchtopk_have_one_prefix_the_whole_dictionary():
    sae = _batchtopk().train()
    assert sae.prefix_ends == (40,) and len(sae.prefix_reconstructions(sae.codes(torch.randn(8, 12)))) == 1


def test_matryoshka_groups_from_fractions_and_an_empty_group_refused():
    assert matryoshka_prefix_ends(64, (1 / 32, 1 / 16, 1 / 8, 1 / 4)) == (2, 6, 14, 30, 64)
    assert matryoshka_prefix_ends(64, ()) == (64,)
    with pytest.raises(ValueError, match="leaves a group of the 16 latents empty"):
        matryoshka_prefix_ends(16, (1 / 32, 1 / 16))
    with pytest.raises(ValueError, match="must increase"):
        MatryoshkaSAE(12, 40, 3, prefix_ends=(10, 4, 40))
    with pytest.raises(ValueError, match="must increase"):
        MatryoshkaSAE(12, 40, 3, prefix_ends=(4, 10))  # the whole dictionary is always the last prefix


def test_a_reloaded_matryoshka_sae_keeps_its_prefixes_threshold_and_reconstruction(tmp_path):
    sae = _matryoshka().eval()
    with torch.no_grad():
        sae.threshold.fill_(0.2)
    sae.save(tmp_path / "sae.pt", layer_signature="L", model_id="m")
    loaded, _ = TopKSAE.load(tmp_path / "sae.pt")
    assert type(loaded) is MatryoshkaSAE and loaded.prefix_ends == (4, 10, 40) and loaded.k == 3
    assert torch.equal(loaded.threshold, sae.threshold)
    x = torch.randn(20, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), sae(x))
