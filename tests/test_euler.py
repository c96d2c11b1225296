"""physnb.sim.euler: the compressible Euler solver against exact solutions (sodshock), invariants, and a peer (pyro-hydro)."""
from __future__ import annotations
import math

import numpy as np
import pytest
import torch

from physnb.sim.euler import (EulerSolver, Euler, LAX_LIU_3, exact_riemann, four_quadrants, quadrant_states, shock_tube,
                              density_wave_error, star_state, primitive)
from physnb.sim.systems import SYSTEMS
from tests.peers import pyro_quad

torch.set_num_threads(1)
SOD = dict(left=(1., 0., 1.), right=(0.125, 0., 0.1))


def sodshock_exact(x, t, left, right, gamma, x0=0.5):
    "density, velocity, pressure from the sodshock package (states as (p, ρ, u); zero velocities only)."
    import sodshock
    (rl, ul, pl), (rr, ur, pr) = left, right
    assert ul == ur == 0, 'sodshock ignores initial velocities'
    _, _, v = sodshock.solve((pl, rl, 0.), (pr, rr, 0.), (0., 1., x0), t, gamma=gamma, npts=400_001)
    return np.stack([np.interp(x, v['x'], v[k]) for k in ('rho', 'u', 'p')])


@pytest.mark.parametrize('left,right,gamma', [((1., 0., 1.), (0.125, 0., 0.1), 1.4),      # Sod
                                              ((0.125, 0., 0.1), (1., 0., 1.), 1.4),      # mirrored: shock to the left
                                              ((1., 0., 2.), (0.3, 0., 0.2), 5 / 3)])     # monatomic gas
def test_exact_riemann_matches_sodshock(left, right, gamma):
    x = (np.arange(400) + 0.5) / 400
    ours = exact_riemann(left, right, torch.tensor(x), 0.2, gamma).numpy()
    theirs = sodshock_exact(x, 0.2, left, right, gamma)
    away = np.abs(ours - theirs).max(0) < 1e-3                   # cells next to a jump may straddle it
    assert away.mean() > 0.98
    np.testing.assert_allclose(ours[:, away], theirs[:, away], atol=1e-6)


def test_sod_converges_at_about_first_order_along_x_and_y():
    errors = []
    for n in (100, 200, 400):
        x, num = shock_tube(n, **{'left': SOD['left'], 'right': SOD['right']})
        errors.append(np.abs(num.numpy() - sodshock_exact(x.numpy(), 0.2, **SOD, gamma=1.4)).mean(1))
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))   # (2 refinements, density/velocity/pressure)
    print('Sod L1 errors', np.array(errors).round(5).tolist(), 'orders', rates.round(2).tolist())
    assert errors[-1][0] < 2e-3 and (0.6 < rates).all() and (rates < 1.4).all()
    torch.testing.assert_close(shock_tube(100, axis='y')[1], shock_tube(100, axis='x')[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize('boundary', ['periodic', 'open'])
def test_uniform_state_stays_uniform(boundary):
    s = EulerSolver(12, 20, gamma=torch.tensor([1.13, 1.4, 2.0]), boundary=boundary)
    W = torch.tensor([0.7, 0.3, -0.4, 1.1], dtype=torch.float64).reshape(1, 4, 1, 1).expand(3, 4, 12, 20)
    U, t, n = s.advance(s.conserved(W), 0., 0.7)
    assert n > 10 and (t == 0.7).all()
    assert torch.equal(U, s.conserved(W))


def test_periodic_box_conserves_mass_momentum_energy_to_rounding():
    states = quadrant_states(3, torch.Generator().manual_seed(0))
    split = torch.tensor([[0.3, 0.6], [0.5, 0.5], [0.7, 0.4]], dtype=torch.float64)
    s = EulerSolver(48, gamma=torch.tensor([1.13, 1.4, 1.76]), boundary='periodic')
    U0 = s.conserved(four_quadrants(s.x, s.y, states, split))
    U1, _, n = s.advance(U0, 0., 0.4)
    drift = (s.totals(U1) - s.totals(U0)).abs() / s.totals(U0).abs().amax(1, keepdim=True)
    assert n > 50 and drift.max() < 1e-14, drift


def test_reflection_symmetric_problems_stay_symmetric():
    s = EulerSolver(40, boundary='open')                         # configuration 3 is symmetric under x <-> y, u <-> v
    W = s.primitive(s.advance(s.conserved(four_quadrants(s.x, s.y, LAX_LIU_3['states'], (0.6, 0.6))), 0., 0.4)[0])
    torch.testing.assert_close(W[:, [0, 2, 1, 3]].transpose(-2, -1), W, rtol=0, atol=1e-12)
    q = torch.tensor([[1.0, 0.3, -0.2, 1.2], [1.0, -0.3, -0.2, 1.2],              # 2 mirrors 1 and 4 mirrors 3
                      [0.4, -0.5, 0.6, 0.5], [0.4, 0.5, 0.6, 0.5]], dtype=torch.float64)   # across x = 1/2
    for boundary in ('open', 'periodic'):
        s = EulerSolver(40, gamma=1.3, boundary=boundary)
        W = s.primitive(s.advance(s.conserved(four_quadrants(s.x, s.y, q, (0.5, 0.3))), 0., 0.3)[0])
        flip = W.flip(-2) * torch.tensor([1., -1, 1, 1], dtype=torch.float64).reshape(1, 4, 1, 1)
        torch.testing.assert_close(flip, W, rtol=0, atol=1e-12)


def test_smooth_density_wave_is_advected_at_second_order():
    errors = [density_wave_error(n) for n in (32, 64, 128)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    print('density wave L1 errors', errors, 'orders', rates)
    assert min(rates) > 1.8, rates
    # Galilean: the same wave carried along x alone or along y alone gives the same error
    assert density_wave_error(32, velocity=(1., 0.)) == pytest.approx(density_wave_error(32, velocity=(0., 1.)), rel=1e-10)


def test_a_batch_evolves_like_its_trajectories_one_by_one():
    states = quadrant_states(3, torch.Generator().manual_seed(1))
    gamma = torch.tensor([1.13, 1.6, 2.0])
    s = EulerSolver(24, gamma=gamma, boundary='periodic')
    batch = s.advance(s.conserved(four_quadrants(s.x, s.y, states)), 0., 0.3)[0]
    for b in range(3):
        one = EulerSolver(24, gamma=gamma[b], boundary='periodic')
        torch.testing.assert_close(batch[b:b + 1], one.advance(one.conserved(four_quadrants(one.x, one.y, states[b])), 0., 0.3)[0],
                                   rtol=0, atol=1e-12)


def test_agrees_with_pyro_hydro_to_truncation_level():
    "Configuration 3, open boundaries, t = 0.3: the two codes differ by less than each differs from its own refinement."
    t, ours = 0.3, {}
    for n in (32, 64, 128):
        s = EulerSolver(n, boundary='open')
        ours[n] = s.advance(s.conserved(four_quadrants(s.x, s.y, LAX_LIU_3['states'], LAX_LIU_3['split'])), 0., t)[0][0].numpy()
    rel = lambda a, b: np.abs(a - b).mean((1, 2)) / np.abs(b).mean((1, 2))
    peer = {n: rel(ours[n], pyro_quad(n, t, LAX_LIU_3['states'], LAX_LIU_3['split'])['U']) for n in (32, 64)}
    own = {n: rel(ours[n], ours[2 * n].reshape(4, n, 2, n, 2).mean((2, 4))) for n in (32, 64)}
    print('relative L1 physnb vs pyro', {n: v.round(4).tolist() for n, v in peer.items()},
          'physnb n vs 2n', {n: v.round(4).tolist() for n, v in own.items()})
    for n in (32, 64): assert (peer[n] < own[n]).all()
    assert (peer[64] < peer[32]).all() and peer[64][0] < 0.02


def test_positivity_violation_names_trajectory_time_and_cell(monkeypatch):
    "A step that produces a negative density stops the run with a message, never a NaN frame."
    calls = []
    original = EulerSolver._step
    def faulty(self, U, W, dt):
        U = original(self, U, W, dt)
        calls.append(1)
        if len(calls) == 3: U = U.clone(); U[1, 0, 3, 5] = -0.5
        return U
    monkeypatch.setattr(EulerSolver, '_step', faulty)
    with pytest.raises(FloatingPointError, match=r'density = -0.5 is not positive in trajectory 1 at t=0\.0\d+, cell \(i=3, j=5\)'):
        Euler().simulate(2, res=16, steps=3, progress=False, device='cpu', dtype=torch.float64)


def test_primitive_reports_negative_pressure():
    W = torch.tensor([1., 2., 0., 1.], dtype=torch.float64).reshape(1, 4, 1, 1)
    U = EulerSolver(2).conserved(W.expand(1, 4, 2, 2))
    U[0, 3, 1, 0] = 0.1                                          # kinetic energy 2 > total energy
    with pytest.raises(FloatingPointError, match=r'pressure = -0.76 is not positive in trajectory 0, cell \(i=1, j=0\)'):
        primitive(U, 1.4)


def test_bad_input_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match='must be finite and > 1'): EulerSolver(8, gamma=1.0)
    with pytest.raises(ValueError, match='must be finite and > 1'): EulerSolver(8, gamma=torch.tensor([1.4, 0.9]))
    with pytest.raises(ValueError, match=r'must be in \(0, 1\]'): EulerSolver(8, cfl=0.)
    with pytest.raises(ValueError, match=r'must be in \(0, 1\]'): EulerSolver(8, cfl=1.2)
    with pytest.raises(ValueError, match="boundary='wall' is not one of 'periodic', 'open'"): EulerSolver(8, boundary='wall')
    with pytest.raises(ValueError, match="limiter='superbee' is not one of 'minmod', 'van_leer', 'mc'"): EulerSolver(8, limiter='superbee')
    s = EulerSolver(8)
    with pytest.raises(ValueError, match=r'quadrant 3: density and pressure must be > 0, got ρ=0.5, p=-1'):
        four_quadrants(s.x, s.y, [[1, 0, 0, 1], [1, 0, 0, 1], [0.5, 0, 0, -1], [1, 0, 0, 1]])
    with pytest.raises(ValueError, match=r'expected \(B, 4, 4\)'): four_quadrants(s.x, s.y, [[1, 0, 0, 1]] * 3)
    with pytest.raises(ValueError, match='density must be finite and > 0'):
        s.conserved(torch.tensor([-1., 0, 0, 1], dtype=torch.float64).reshape(1, 4, 1, 1))
    with pytest.raises(ValueError, match='must be finite and > 1'): exact_riemann(*SOD.values(), torch.zeros(3), 0.1, gamma=1.)
    with pytest.raises(ValueError, match='densities and pressures must be > 0'): star_state((1, 0, -1), (1, 0, 1))
    with pytest.raises(ValueError, match='outside its allowed range'):
        Euler().simulate(2, res=8, steps=1, params={'gamma': 1.0}, progress=False)
    with pytest.raises(ValueError, match="'quadrants', 'quadrants_centred', 'lax_liu_3'"):
        Euler().simulate(2, res=8, steps=1, ic='sod', progress=False)


def test_cli_generates_euler_that_the_well_loads(tmp_path, capsys):
    from physnb.cli import main
    from the_well.data import WellDataset
    for boundary in ('open', 'periodic'):
        main(['generate', 'euler', '--out', str(tmp_path), '--n-traj', '4', '--res', '16', '--steps', '4',
              '--boundary', boundary, '--device', 'cpu'])
    ds = WellDataset(path=str(tmp_path / 'euler_open' / 'data' / 'train'), n_steps_input=2, n_steps_output=1,
                     use_normalization=False)
    sample = ds[0]
    assert ds.metadata.field_names[0] == ['energy', 'density', 'pressure']
    assert ds.metadata.field_names[1] == ['momentum_x', 'momentum_y']
    assert sample['input_fields'].shape == (2, 16, 16, 5) and (sample['boundary_conditions'] == 1).all()   # OPEN
    assert min(abs(float(sample['constant_scalars'][0]) - g) for g in (1.13, 1.22, 1.3, 1.33, 1.365, 1.4, 1.404, 1.453, 1.597, 1.76)) < 1e-6
    periodic = WellDataset(path=str(tmp_path / 'euler' / 'data' / 'train'), n_steps_input=1, n_steps_output=1, use_normalization=False)
    assert (periodic[0]['boundary_conditions'] == 2).all()      # PERIODIC
    capsys.readouterr()
    assert main(['generate', 'euler', '--out', str(tmp_path), '--boundary', 'wall']) == 2
    assert "--boundary='wall' is not one of 'periodic', 'open' for system 'euler'" in capsys.readouterr().err
    assert main(['generate', 'gray_scott', '--out', str(tmp_path), '--boundary', 'open']) == 2
    assert "is not one of 'periodic' for system 'gray_scott'" in capsys.readouterr().err
    main(['systems'])
    assert 'euler: ic=quadrants, quadrants_centred, lax_liu_3; param_splits=id, ood, all; boundary=periodic, open' in capsys.readouterr().out


def test_system_draws_gamma_from_its_split():
    e = SYSTEMS['euler']
    ood = e.simulate(8, res=8, steps=1, param_split='ood', progress=False, device='cpu').scalars['gamma']
    assert ((ood < 1.13) | (ood > 1.76)).all()
    ind = e.simulate(8, res=8, steps=1, param_split='id', progress=False, device='cpu').scalars['gamma']
    assert ((ind >= 1.13 - 1e-6) & (ind <= 1.76 + 1e-6)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu():
    a, b = (Euler().simulate(3, res=32, steps=5, seed=2, device=d, dtype=torch.float64, progress=False) for d in ('cpu', 'cuda'))
    for k in a.fields: torch.testing.assert_close(b.fields[k].cpu(), a.fields[k], rtol=1e-9, atol=1e-9)
