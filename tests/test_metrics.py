"physnb.metrics against the_well 1.2.0's own implementation (the oracle; physnb never imports it)."
import math

import pytest
import torch

from physnb.metrics import binned_spectral_error, nrmse, relative_l2, vrmse, wavenumber_bins

torch.set_num_threads(1)


def _well():
    pytest.importorskip('matplotlib', reason='the_well.benchmark.metrics imports matplotlib')
    metrics = pytest.importorskip('the_well.benchmark.metrics')
    from the_well.data.datasets import WellMetadata
    return metrics, WellMetadata


def _meta(WellMetadata, shape):
    d = len(shape)
    return WellMetadata(dataset_name='random', n_spatial_dims=d, spatial_resolution=tuple(shape), scalar_names=[],
                        constant_scalar_names=[], field_names={0: ['a', 'b', 'c']}, constant_field_names={},
                        boundary_condition_types=['PERIODIC'] * d, n_files=1, n_trajectories_per_file=[1],
                        n_steps_per_trajectory=[1])


def _pair(shape, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(*shape, generator=g, dtype=dtype) + offset
    pred = target + 0.3 * torch.randn(*shape, generator=g, dtype=dtype)
    return pred, target


CASES = [((3, 4, 32, 32, 3), 2), ((2, 16, 24, 2), 2), ((2, 8, 8, 8, 1), 3), ((4, 64, 2), 1)]


@pytest.mark.oracle
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape,d', CASES)
def test_vrmse_nrmse_match_the_well(shape, d, dtype):
    metrics, WellMetadata = _well()
    meta = _meta(WellMetadata, shape[-d - 1:-1])
    pred, target = _pair(shape, dtype, offset=0.5)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(vrmse(pred, target, spatial_dims=d), metrics.VRMSE.eval(pred, target, meta), **tol)
    torch.testing.assert_close(nrmse(pred, target, spatial_dims=d), metrics.NRMSE.eval(pred, target, meta), **tol)


@pytest.mark.oracle
def test_eps_is_the_wells_1e_7_even_for_tiny_variance():
    "A nearly uniform field: the normaliser is dominated by eps, so a wrong eps shows at once."
    metrics, WellMetadata = _well()
    shape = (2, 16, 16, 1)
    meta = _meta(WellMetadata, shape[1:3])
    pred, target = _pair(shape, torch.float64)
    pred, target = 1e-4 * pred, 1e-4 * target           # variance ~1e-8 < eps
    torch.testing.assert_close(vrmse(pred, target), metrics.VRMSE.eval(pred, target, meta), rtol=1e-12, atol=0)
    # the_well ignores eps for VRMSE; ours forwards it, and Walrus' 1e-5 gives a visibly different number
    assert (vrmse(pred, target, eps=1e-5) / vrmse(pred, target)).max() < 0.2


@pytest.mark.oracle
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape,d', CASES)
def test_binned_spectral_error_matches_the_well(shape, d, dtype):
    metrics, WellMetadata = _well()
    meta = _meta(WellMetadata, shape[-d - 1:-1])
    pred, target = _pair(shape, dtype, seed=1, offset=0.2)
    well = metrics.binned_spectral_mse.eval(pred, target, meta)
    ours_n = binned_spectral_error(pred, target, spatial_dims=d)
    ours_mse = binned_spectral_error(pred, target, spatial_dims=d, normalise=False)
    # agreement is at rounding level: on square power-of-two grids some modes sit exactly on a band edge, so
    # this only holds because we compute |k| and the edges in float32 like the_well
    tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-15)
    for i in range(3):
        torch.testing.assert_close(ours_n[..., i, :].double(), well[f'spectral_error_nmse_per_bin_{i}'].double(), **tol)
        torch.testing.assert_close(ours_mse[..., i, :].double(), well[f'spectral_error_mse_per_bin_{i}'].double(), **tol)


@pytest.mark.oracle
def test_custom_bins_match_the_well():
    metrics, WellMetadata = _well()
    shape = (2, 32, 32, 2)
    meta = _meta(WellMetadata, shape[1:3])
    pred, target = _pair(shape, torch.float64, seed=2)
    edges = wavenumber_bins((32, 32), 6)
    well = metrics.binned_spectral_mse.eval(pred, target, meta, bins=edges.clone())
    ours = binned_spectral_error(pred, target, bins=edges)
    for i in range(6):
        torch.testing.assert_close(ours[..., i, :], well[f'spectral_error_nmse_per_bin_{i}'], rtol=1e-12, atol=1e-15)


def test_default_bins_are_the_wells_three_log_spaced_bands():
    edges = wavenumber_bins((64, 64))
    ref = torch.logspace(math.log10(2 * math.pi / 64), math.log10(math.pi * math.sqrt(2) + 1e-6), 4)
    ref[0] = 0
    assert edges.dtype == torch.float32      # float32 like the_well: it decides the band of on-edge modes
    torch.testing.assert_close(edges, ref, rtol=0, atol=0)


def test_spectral_bands_add_up_to_the_mse():
    pred, target = _pair((3, 20, 28, 2), torch.float64)
    parts = binned_spectral_error(pred, target, n_bins=5, normalise=False)
    torch.testing.assert_close(parts.sum(-2), (pred - target).pow(2).mean((1, 2)))


def test_predicting_the_mean_gives_vrmse_one():
    _, target = _pair((8, 64, 64, 3), torch.float64)
    mean = target.mean((1, 2), keepdim=True).expand_as(target)
    assert (vrmse(mean, target) - 1).abs().max() < 1e-3


def test_relative_l2_is_per_sample_and_scale_free():
    pred, target = _pair((6, 1, 16, 16), torch.float64)
    err = relative_l2(pred, target)
    assert err.shape == (6,)
    torch.testing.assert_close(relative_l2(3 * pred, 3 * target), err)
    by_hand = torch.stack([torch.linalg.norm(p - t) / torch.linalg.norm(t) for p, t in zip(pred, target)])
    torch.testing.assert_close(err, by_hand)
