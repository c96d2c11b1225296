"Facts about the steady operator families (physnb.sim.steady): exact solves, Ψ targeting, rejection, sources, data plumbing."
import math

import pytest
import torch

from physnb.sim.steady import (COEFFICIENTS, HELMHOLTZ_MAX, MIXTURE_CHANNELS, advection_diffusion_ratio,
                               apply_steady_operator, gaussian_lattice_source, lattice_centres,
                               sample_amplitudes, solve_steady, steady_symbol, unit_grid, BUMP_WIDTH)
from physnb.sim.systems import SYSTEMS as ALL_SYSTEMS
from physnb.data.windows import SteadyPairs, operator_inputs
SYSTEMS = {n: s for n, s in ALL_SYSTEMS.items() if type(s).__module__ == 'physnb.sim.steady'}   # the systems physnb.sim.steady defines

torch.set_num_threads(1)


def _coefficients(traj):
    return {k: traj.scalars[k].double() for k in COEFFICIENTS if k in traj.scalars}


@pytest.mark.parametrize('name', list(SYSTEMS))
@pytest.mark.parametrize('split', ['id', 'ood'])
def test_spectral_residual_is_below_1e_8_in_float64(name, split):
    traj = SYSTEMS[name].simulate(32, res=64, seed=11, dtype=torch.float64, param_split=split, progress=False)
    f, u = traj.fields['source'][:, 0], traj.fields['solution'][:, 0]
    coefficients = _coefficients(traj)
    # the forward operator applied spectrally (symbol times û) gives back f ...
    grid = unit_grid(64)
    spectral = grid.ifft(steady_symbol(grid, coefficients) * grid.fft(u))
    assert (spectral - f).abs().max() <= 1e-8
    # ... and so does the operator assembled in physical space from spectral derivatives
    assert (apply_steady_operator(u, coefficients) - f).abs().max() <= 1e-8


def test_every_term_of_the_operator_is_solved_exactly():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(4, 48, 48, generator=gen, dtype=torch.float64)
    f = f - f.mean((-2, -1), keepdim=True)
    c = {k: torch.rand(4, generator=gen, dtype=torch.float64) * s
         for k, s in dict(K11=0.05, K22=0.05, K12=0.01, v1=1., v2=1., omega=0.).items()}
    c['K11'] += 0.02; c['K22'] += 0.02   # K positive definite
    u = solve_steady(f, c)
    assert (apply_steady_operator(u, c) - f).abs().max() <= 1e-10


def test_solution_is_invariant_under_joint_scaling_of_source_and_coefficients():
    traj = SYSTEMS['advection_diffusion'].simulate(8, res=32, seed=1, dtype=torch.float64, progress=False)
    f, c = traj.fields['source'][:, 0], _coefficients(traj)
    scale = torch.linspace(0.1, 30, 8, dtype=torch.float64)
    u = solve_steady(f * scale[:, None, None], {k: v * scale for k, v in c.items()})
    torch.testing.assert_close(u, traj.fields['solution'][:, 0], atol=1e-12, rtol=0)


def test_helmholtz_rejection_keeps_max_abs_u_at_most_2():
    system = SYSTEMS['helmholtz']
    for split in ('id', 'ood'):
        traj = system.simulate(256, res=32, seed=5, param_split=split, dtype=torch.float64, progress=False)
        assert traj.fields['solution'].abs().max() <= HELMHOLTZ_MAX
    # the filter is active: ω = 2 (|symbol| = 0.026 at |m|² = 5) blows up and never survives it
    traj = system.simulate(256, res=32, seed=5, dtype=torch.float64, progress=False)
    assert 2 not in set(traj.scalars['omega'].long().tolist())
    f = traj.fields['source'][:16, 0]
    raw = solve_steady(f, dict(K11=torch.full((16,), 0.01), K22=torch.full((16,), 0.01), omega=torch.full((16,), 2.)))
    assert (raw.flatten(1).abs().amax(1) > HELMHOLTZ_MAX).float().mean() > 0.9


def test_helmholtz_fixed_omega_is_kept_while_sources_are_redrawn():
    traj = SYSTEMS['helmholtz'].simulate(16, res=32, seed=0, params={'omega': 7}, progress=False)
    assert set(traj.scalars['omega'].tolist()) == {7.}
    assert traj.fields['solution'].abs().max() <= HELMHOLTZ_MAX


@pytest.mark.parametrize('split,low,high', [('id', 0.2, 1.), ('ood_psi1_5', 1., 5.)])
def test_advection_diffusion_hits_its_target_psi(split, low, high):
    traj = SYSTEMS['advection_diffusion'].simulate(64, res=64, seed=2, param_split=split, dtype=torch.float64, progress=False)
    psi = traj.scalars['psi']
    assert ((psi >= low) & (psi <= high)).all()
    c = _coefficients(traj)
    u = traj.fields['solution'][:, 0]
    torch.testing.assert_close(advection_diffusion_ratio(u, c), psi, atol=0, rtol=1e-9)
    # physical-space norms of the two terms, independently of the Parseval sums
    diffusive = apply_steady_operator(u, {k: c[k] for k in ('K11', 'K22', 'K12')}).flatten(1).norm(dim=1)
    advective = apply_steady_operator(u, {k: c[k] for k in ('v1', 'v2')}).flatten(1).norm(dim=1)
    torch.testing.assert_close(advective / diffusive, psi, atol=0, rtol=1e-9)
    # |v_eff| = λ and K_eff = (1 - λ) K with trace 0.01 (1 + e)
    lam = traj.scalars['advection_weight']
    torch.testing.assert_close(torch.hypot(c['v1'], c['v2']), lam)
    torch.testing.assert_close(c['K11'] + c['K22'], 0.01 * (1 - lam) * (1 + traj.scalars['eigen_ratio']))


def test_separable_source_equals_naive_sum_of_bumps():
    amps = sample_amplitudes(3, torch.Generator().manual_seed(3))
    n = 48
    x = torch.arange(n, dtype=torch.float64) / n
    X, Y = torch.meshgrid(x, x, indexing='ij')
    c = lattice_centres()
    naive = torch.zeros(3, n, n, dtype=torch.float64)
    for i in range(12):
        for j in range(12):
            naive += amps[:, i, j, None, None] * torch.exp(-((X - c[i])**2 + (Y - c[j])**2) / (2 * BUMP_WIDTH**2))
    torch.testing.assert_close(gaussian_lattice_source(amps, n), naive, atol=1e-12, rtol=1e-12)


def test_sources_are_normalised_and_zero_mean_where_needed():
    for name, zero_mean in (('poisson', True), ('advection_diffusion', True), ('helmholtz', False)):
        f = SYSTEMS[name].simulate(16, res=32, seed=0, dtype=torch.float64, progress=False).fields['source'][:, 0]
        if zero_mean:
            torch.testing.assert_close(f.mean((-2, -1)), torch.zeros(16, dtype=torch.float64), atol=1e-14, rtol=0)
        else:
            assert (f >= 0).all()
            torch.testing.assert_close(f.amax((-2, -1)), torch.ones(16, dtype=torch.float64))


@pytest.mark.parametrize('name', list(SYSTEMS))
def test_seeded_generation_is_reproducible(name):
    a = SYSTEMS[name].simulate(8, res=32, seed=4, progress=False)
    b = SYSTEMS[name].simulate(8, res=32, seed=4, progress=False)
    c = SYSTEMS[name].simulate(8, res=32, seed=5, progress=False)
    for k in a.fields: assert torch.equal(a.fields[k], b.fields[k])
    for k in a.scalars: assert torch.equal(a.scalars[k], b.scalars[k])
    assert not torch.equal(a.fields['source'], c.fields['source'])


def test_splits_draw_in_their_ranges():
    ranges = {('poisson', 'pretrain'): ('eigen_ratio', 1, 5), ('poisson', 'ood_e5_10'): ('eigen_ratio', 5, 10),
              ('poisson', 'ood_e10_20'): ('eigen_ratio', 10, 20), ('helmholtz', 'pretrain'): ('omega', 1, 10),
              ('helmholtz', 'ood_omega10_20'): ('omega', 10, 20), ('advection_diffusion', 'ood'): ('psi', 1, 5)}
    for (name, split), (param, lo, hi) in ranges.items():
        v = SYSTEMS[name].sample_params(200, split, torch.Generator().manual_seed(0))[param]
        assert ((v >= lo) & (v <= hi)).all(), (name, split)
    assert all({'id', 'ood', 'pretrain'} <= set(s.param_splits) for s in SYSTEMS.values())
    omega = SYSTEMS['helmholtz'].sample_params(200, 'ood', torch.Generator().manual_seed(0))['omega']
    assert torch.equal(omega, omega.round())


def test_trajectories_are_one_step_with_scalar_coefficients():
    traj = SYSTEMS['poisson'].simulate(4, res=16, seed=0, progress=False)
    assert traj.shape == (4, 1, 16, 16) and list(traj.fields) == ['source', 'solution']
    assert traj.fields['solution'].dtype == torch.float32
    assert {'K11', 'K22', 'K12', 'eigen_ratio', 'angle', 'void_fraction'} <= set(traj.scalars)
    assert traj.bcs == {'x': 'periodic', 'y': 'periodic'}
    torch.testing.assert_close(traj.coords['x'], torch.arange(16) / 16)


def test_mixture_layout_zero_fills_missing_coefficients():
    trajs = [SYSTEMS[k].simulate(3, res=16, seed=0, progress=False) for k in SYSTEMS]
    for traj in trajs:
        x = operator_inputs(traj, 'mixture')
        assert x.shape == (3, len(MIXTURE_CHANNELS), 16, 16)
        for i, name in enumerate(MIXTURE_CHANNELS[1:], start=1):
            want = traj.scalars.get(name, torch.zeros(3))
            torch.testing.assert_close(x[:, i], want[:, None, None].expand(3, 16, 16))
    assert [operator_inputs(t).shape[1] for t in trajs] == [4, 6, 3]
    pairs = SteadyPairs(trajs, channels='mixture')
    assert len(pairs) == 9 and pairs[0][0].shape == (7, 16, 16)
    with pytest.raises(ValueError, match="channels='mixture'"):
        SteadyPairs(trajs)   # one 'system' layout cannot hold three families


def test_well_files_round_trip_into_pairs(tmp_path):
    from physnb.data.well import check_well_file, write_well
    from physnb.data.generate import generate_dataset
    traj = SYSTEMS['advection_diffusion'].simulate(6, res=16, seed=0, progress=False)
    path = write_well(traj, tmp_path / 'ad.hdf5')
    check_well_file(path)
    torch.testing.assert_close(SteadyPairs(path).tensors(), SteadyPairs(traj).tensors())
    out = generate_dataset(SYSTEMS['poisson'], tmp_path, n_traj=10, res=16, param_split='ood_e10_20', progress=False)
    pairs = SteadyPairs(out['root'] / 'data')
    assert len(pairs) == 10 and pairs.channels == ('source', 'K11', 'K22', 'K12')


@pytest.mark.oracle
def test_the_well_reads_a_steady_file(tmp_path):
    the_well = pytest.importorskip('the_well.data')
    from physnb.data.well import write_well
    traj = SYSTEMS['helmholtz'].simulate(4, res=16, seed=0, progress=False)
    write_well(traj, tmp_path / 'helmholtz' / 'data' / 'train' / 'helmholtz.hdf5')
    ds = the_well.WellDataset(path=str(tmp_path / 'helmholtz'), well_split_name='train',
                              n_steps_input=1, n_steps_output=0, use_normalization=False)
    sample = ds[0]
    torch.testing.assert_close(sample['input_fields'][0, ..., 0], traj.fields['source'][0, 0])


def test_clear_errors():
    with pytest.raises(ValueError, match="'pretrain'"):
        SYSTEMS['poisson'].simulate(2, res=8, param_split='huge', progress=False)
    with pytest.raises(ValueError, match="not among"):
        solve_steady(torch.zeros(1, 8, 8), {'kappa': torch.ones(1)})
    with pytest.raises(ValueError, match="'system', 'mixture'"):
        operator_inputs(SYSTEMS['poisson'].simulate(2, res=8, progress=False), 'all')


def test_a_fixed_resonant_omega_fails_clearly_instead_of_looping():
    with pytest.raises(RuntimeError, match='resonance'):
        SYSTEMS['helmholtz'].simulate(2, res=16, params={'omega': 2}, progress=False)
