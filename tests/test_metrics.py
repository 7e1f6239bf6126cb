import torch

from saekit.training.reconstruction import ReconstructionStats, fvu, overcomplete_r2


def _stats_over_batches(x, x_hat, batch):
    stats = ReconstructionStats(n_latents=4)
    dummy_values = torch.ones(len(x), 2)
    dummy_indices = torch.tensor([[0, 1]]).repeat(len(x), 1)
    for lo in range(0, len(x), batch):
        stats.update(x[lo:lo + batch], x_hat[lo:lo + batch], dummy_values[lo:lo + batch], dummy_indices[lo:lo + batch])
    return stats


def test_fvu_of_predicting_the_mean_is_one_and_of_a_perfect_reconstruction_zero():
    x = torch.randn(500, 8) * torch.arange(1, 9) + 5
    assert abs(fvu(x, x.mean(0).expand_as(x)) - 1) < 1e-12
    assert fvu(x, x) == 0
    stats = _stats_over_batches(x, x.mean(0).expand_as(x).clone(), 64)
    assert abs(stats.fvu - 1) < 1e-9
    assert _stats_over_batches(x, x.clone(), 64).fvu == 0


def test_streamed_fvu_agrees_with_a_float64_reference_whatever_the_batching():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1000, 32, generator=g) * 3 + 100).float()  # a large mean stresses cancellation
    x_hat = x + 0.5 * torch.randn(1000, 32, generator=g)
    x64, xh64 = x.double(), x_hat.double()
    reference = float(((x64 - xh64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum())
    for batch in (7, 100, 1000):
        stats = _stats_over_batches(x, x_hat, batch)
        assert abs(stats.fvu - reference) < 1e-9 * max(1, reference)
        assert abs(stats.summary()["r2"] - (1 - reference)) < 1e-9


def test_l0_dead_dense_and_frequencies():
    stats = ReconstructionStats(n_latents=5)
    x = torch.zeros(10, 3)
    values = torch.tensor([[1.0, 0.0]] * 10)  # the second slot never fires (value 0)
    indices = torch.tensor([[0, 3]] * 5 + [[1, 3]] * 5)
    stats.update(x + torch.randn(10, 3), x, values, indices)
    s = stats.summary()
    assert s["l0"] == 1.0
    assert stats.fire_counts.tolist() == [5, 5, 0, 0, 0]
    assert s["dead"] == 3 and s["dense"] == 2
    assert stats.frequencies.tolist() == [0.5, 0.5, 0, 0, 0]


def test_overcomplete_r2_overstates_when_dimensions_have_different_means():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g) + torch.linspace(-5, 5, 16)
    x_hat = x.mean(0).expand_as(x)  # explains nothing
    assert abs(fvu(x, x_hat) - 1) < 1e-9
    assert overcomplete_r2(x, x_hat) > 0.8  # yet the scalar-mean R^2 reports most variance explained
