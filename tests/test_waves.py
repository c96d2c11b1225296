"""Physics tests for physnb.sim.waves: rotating shallow water and heterogeneous acoustics (float64 unless stated)."""
import math

import pytest
import torch

from physnb.core import Trajectories
from physnb.sim.pdes import SpectralGrid2D
from physnb.viz.fields import animate
from physnb.sim.systems import SYSTEMS as ALL_SYSTEMS
from physnb.sim.waves import (Acoustics, AcousticsSolver, DENSITY_FAMILIES, ShallowWater, ShallowWaterSolver,
                              acoustic_frequency, balanced_state, density_field, pressure_sources,
                              staggered_difference)
SYSTEMS = {n: s for n, s in ALL_SYSTEMS.items() if type(s).__module__ == 'physnb.sim.waves'}   # the systems physnb.sim.waves defines

torch.set_num_threads(1)
F64 = torch.float64


def bump(g, x0, y0, width):
    "Smooth periodic Gaussian on a SpectralGrid2D."
    d2 = ((g.lx / math.pi) * torch.sin(math.pi * (g.X - x0) / g.lx))**2 \
       + ((g.ly / math.pi) * torch.sin(math.pi * (g.Y - y0) / g.ly))**2
    return torch.exp(-d2 / (2 * width**2))


def at_rest(h):
    return torch.zeros(*h.shape, 2, dtype=h.dtype, device=h.device)


# ------------------------------------------------------------------------------------------------
# shallow water
# ------------------------------------------------------------------------------------------------

def test_shallow_water_mass_is_conserved_to_round_off():
    "∫h is the k=0 mode and the flux divergence has none: mass is exact even with strong nonlinearity and ν₄ > 0."
    g = SpectralGrid2D(32, dtype=F64)
    h0 = (0.4 * bump(g, 2., 3., 0.4) - 0.3 * bump(g, 4.5, 1., 0.5) + 0.1).expand(3, -1, -1)
    sw = ShallowWaterSolver(g, coriolis=[0., 2., 8.], hyperviscosity=1e-4)
    s = s0 = sw.to_spectral(h0, at_rest(h0))
    for _ in range(20): s = sw.advance(s, 0.25)
    m0 = sw.mass(s0)
    assert m0.abs().min() > 1                                         # a non-trivial mass
    assert ((sw.mass(s) - m0).abs() / m0.abs()).max() < 1e-13


def test_shallow_water_energy_drift_shrinks_like_dt5():
    "With ν₄ = 0 the energy ½∫((H+h)|u|²+gh²) drifts only through RK4's O(dt⁵) damping of oscillations."
    g = SpectralGrid2D(32, dtype=F64)
    h0 = (0.1 * bump(g, 2., 3., 0.6) - 0.05 * bump(g, 4.5, 1., 0.5)).expand(2, -1, -1)
    sw = ShallowWaterSolver(g, coriolis=[0., 3.])
    s0 = sw.to_spectral(h0, at_rest(h0))
    E0 = sw.energy(s0)
    drift = []
    for dt in (0.1, 0.05, 0.025, 0.0125):
        s = sw.stepper(dt)(s0, round(4 / dt))
        drift.append(((sw.energy(s) - E0).abs() / E0).max().item())
    rates = [math.log2(drift[i] / drift[i + 1]) for i in range(3)]
    assert drift[-1] < 2e-8, drift
    assert all(r > 4.5 for r in rates), rates


def test_shallow_water_linear_dispersion_is_fourth_order():
    "A small single mode follows ω² = f² + gH|k|² (plus its balanced part) at 4th order in dt."
    g = SpectralGrid2D(16, dtype=F64)
    f, (kx, ky), eps, T = torch.tensor([0., 1.5, 6.], dtype=F64), (2, 1), 1e-8, 6.
    gravity, depth = 2., 0.5                                         # gH = 1 but g ≠ H: checks both enter correctly
    omega = torch.sqrt(f**2 + gravity * depth * (kx**2 + ky**2))[:, None, None]
    h0 = eps * torch.cos(kx * g.X + ky * g.Y).expand(3, -1, -1)
    exact = h0 * ((f[:, None, None] / omega)**2 + gravity * depth * (kx**2 + ky**2) / omega**2 * torch.cos(omega * T))
    sw = ShallowWaterSolver(g, coriolis=f, gravity=gravity, depth=depth)
    errs = []
    for dt in (0.05, 0.025, 0.0125):
        s = sw.stepper(dt)(sw.to_spectral(h0, at_rest(h0)), round(T / dt))
        errs.append(((sw.to_physical(s)[0] - exact).abs().max() / eps).item())
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert errs[-1] < 2e-6 and all(o > 3.5 for o in orders), (errs, orders)


def test_shallow_water_simple_wave_matches_characteristics_spectrally():
    "Nonlinear exact solution (f = 0, 1-D): with u − 2c uniform, c = √(g(H+h)) rides the characteristics x = ξ + (3c₀(ξ) − 2√gH)t."
    a = 0.1
    c0 = lambda xi: torch.sqrt(1 + a * torch.sin(xi))
    t_break = 2 * math.sqrt(1 - a) / (3 * a)
    T = 0.5 * t_break
    errs = []
    for n in (32, 64, 128):
        g = SpectralGrid2D(n, 4, dtype=F64)
        h0, u0 = c0(g.X)**2 - 1, 2 * (c0(g.X) - 1)
        sw = ShallowWaterSolver(g, coriolis=0.)
        s = sw.advance(sw.to_spectral(h0[None], torch.stack([u0, 0 * u0], -1)[None]), T, cfl=0.1)
        xi = g.X.clone()
        for _ in range(200): xi = g.X - (3 * c0(xi) - 2) * T
        h, vel = sw.to_physical(s)
        errs.append(max((h[0] - (c0(xi)**2 - 1)).abs().max().item(), (vel[0, ..., 0] - 2 * (c0(xi) - 1)).abs().max().item()))
        assert vel[0, ..., 1].abs().max() < 1e-14                    # nothing happens across
    assert errs[0] < 1e-4 and errs[1] < 1e-7 and errs[2] < 1e-9, errs   # spectral (faster than algebraic) convergence
    assert errs[0] / errs[1] > 100


def test_shallow_water_linear_pv_is_conserved_pointwise():
    "In the linear regime q = ζ − f h/H does not change anywhere, while h and u change by O(1)."
    g = SpectralGrid2D(32, dtype=F64)
    eps = 1e-9
    h0 = eps * (bump(g, 2., 3., 0.5) - bump(g, 4., 5., 0.8))[None].expand(2, -1, -1)
    vel0 = eps * torch.stack([torch.sin(g.Y), torch.cos(2 * g.X)], -1)[None].expand(2, -1, -1, -1)
    sw = ShallowWaterSolver(g, coriolis=[1., 5.])
    s0 = sw.to_spectral(h0, vel0)
    s = s0
    for _ in range(10): s = sw.advance(s, 0.5)
    q0, q = sw.linear_potential_vorticity(s0), sw.linear_potential_vorticity(s)
    assert ((q - q0).abs().max() / q0.abs().max()) < 1e-6
    assert (sw.to_physical(s)[0] - sw.to_physical(s0)[0]).abs().max() > 0.1 * eps   # the state did evolve


def test_shallow_water_potential_enstrophy_is_conserved():
    "Nonlinear PV q = (ζ+f)/(H+h) is carried by the flow: ½∫(H+h)q² (a Casimir) holds to ~1e-11; circulation exactly."
    g = SpectralGrid2D(32, dtype=F64)
    h0 = (0.1 * bump(g, 2., 3., 0.7) - 0.08 * bump(g, 4.5, 1., 0.8)).expand(2, -1, -1)
    vel0 = torch.stack([0.1 * torch.sin(g.Y) + 0.05 * torch.cos(g.X + g.Y), 0.1 * torch.cos(g.X)], -1).expand(2, -1, -1, -1)
    sw = ShallowWaterSolver(g, coriolis=[0.5, 3.])
    s = s0 = sw.to_spectral(h0, vel0)
    for _ in range(8): s = sw.advance(s, 0.5, cfl=0.2)
    Z0, Z = sw.potential_enstrophy(s0), sw.potential_enstrophy(s)
    assert ((Z - Z0).abs() / Z0).max() < 1e-9
    circulation = lambda s: ((sw.depth + sw.to_physical(s)[0]) * sw.potential_vorticity(s)).sum((-2, -1))
    torch.testing.assert_close(circulation(s), circulation(s0), rtol=1e-13, atol=1e-12)
    assert (sw.potential_vorticity(s) - sw.potential_vorticity(s0)).abs().max() > 1e-3   # q itself moved


def test_balanced_state_is_steady_and_has_the_given_pv():
    g = SpectralGrid2D(32, dtype=F64)
    f = torch.tensor([0.5, 2., 6.], dtype=F64)
    q = 1e-8 * (bump(g, 3., 3., 0.5) - bump(g, 1., 5., 0.7)).expand(3, -1, -1)
    q = g.ifft(g.fft(q) * g.dealias_mask())
    q = q - q.mean((-2, -1), keepdim=True)
    hb, ub = balanced_state(g, q, f)
    sw = ShallowWaterSolver(g, coriolis=f)
    sb = sw.to_spectral(hb, ub)
    assert (sw.linear_potential_vorticity(sb) - q).abs().max() < 1e-12 * q.abs().max()
    # geostrophic: f ẑ×u = −g∇h, and non-divergent
    gh_x, gh_y = g.ifft(g.ddx(g.fft(hb))), g.ifft(g.ddy(g.fft(hb)))
    fz = f[:, None, None]
    assert (fz * -ub[..., 1] + gh_x).abs().max() < 1e-12 * gh_x.abs().max()
    assert (fz * ub[..., 0] + gh_y).abs().max() < 1e-12 * gh_y.abs().max()
    assert (g.ifft(sw.tendency(sb)).abs().max() / g.ifft(sb).abs().max()) < 1e-8


def test_geostrophic_adjustment_reaches_the_balanced_state():
    "A bump released from rest (f = 3): the time mean over t ∈ [10, 30] is the PV-inverted balanced vortex."
    g = SpectralGrid2D(32, dtype=F64)
    f, eps = torch.tensor([3.], dtype=F64), 1e-8
    h0 = eps * bump(g, math.pi, math.pi, 0.6)[None]
    sw = ShallowWaterSolver(g, coriolis=f)
    s = sw.to_spectral(h0, at_rest(h0))
    h_pred, u_pred = balanced_state(g, sw.linear_potential_vorticity(s), f, mean_height=h0.mean())
    h_mean = u_mean = 0
    for i in range(300):
        s = sw.advance(s, 0.1)
        if i >= 100:
            h, vel = sw.to_physical(s)
            h_mean, u_mean = h_mean + h / 200, u_mean + vel / 200
    norm = (h_pred - h_pred.mean()).norm()
    assert (h0 - h_pred).norm() / norm > 0.3                           # far from balance at first
    assert (h_mean - h_pred).norm() / norm < 0.02
    assert (u_mean - u_pred).norm() / u_pred.norm() < 0.05


def test_small_amplitude_shallow_water_equals_acoustics():
    "Two independent solvers: linear SWE (f = 0) is acoustics with ρ = 1, K = gH, p = g h; they converge to each other."
    diffs = []
    for n in (32, 64):
        g = SpectralGrid2D(n, dtype=F64)
        eps = 1e-8
        h0 = eps * bump(g, 3., 3., 0.5)[None]
        sw = ShallowWaterSolver(g, coriolis=0., gravity=2., depth=0.5)
        h_sw, _ = sw.to_physical(sw.advance(sw.to_spectral(h0, at_rest(h0)), 1.5, cfl=0.1))
        ac = AcousticsSolver(torch.ones_like(h0), bulk_modulus=1., dx=g.dx, order=4)
        dt = 1.5 / math.ceil(1.5 / (0.1 * float(ac.max_stable_dt())))
        p, _, _ = ac.advance(2. * h0, torch.zeros_like(h0), torch.zeros_like(h0), dt, round(1.5 / dt))
        diffs.append(((p / 2. - h_sw).abs().max() / eps).item())
    assert diffs[-1] < 2e-3 and diffs[0] / diffs[1] > 3.5, diffs


def test_shallow_water_substeps_follow_the_cfl_condition():
    g = SpectralGrid2D(32, dtype=F64)
    h0 = 0.1 * bump(g, 3., 3., 0.5)[None]
    slow, fast = ShallowWaterSolver(g, 0.), ShallowWaterSolver(g, 40.)
    for sw in (slow, fast): sw.advance(sw.to_spectral(h0, at_rest(h0)), 0.5)
    assert fast._stepper.dt < slow._stepper.dt                         # rotation shortens the step
    omega = float(fast.max_frequency(fast.to_spectral(h0, at_rest(h0))).max())
    assert omega * fast._stepper.dt <= 0.5 * 2 * math.sqrt(2) + 1e-12


def test_shallow_water_simulate_api():
    sys_ = ShallowWater()
    tr = sys_.simulate(3, res=16, steps=4, seed=7, progress=False)
    assert isinstance(tr, Trajectories) and tr.name == 'shallow_water'
    assert list(tr.fields) == ['height', 'velocity']
    assert tr.fields['height'].shape == (3, 5, 16, 16) and tr.fields['velocity'].shape == (3, 5, 16, 16, 2)
    assert tr.fields['height'].dtype == torch.float32
    assert tr.attrs['ic'] == list(sys_.ic_families)
    assert tr.bcs == {'x': 'periodic', 'y': 'periodic'}
    torch.testing.assert_close(tr.time, torch.arange(5, dtype=torch.float32) * 0.2)
    assert set(tr.scalars) == {'coriolis', 'amplitude'}
    assert tr.scalars['coriolis'].min() >= 0 and tr.scalars['coriolis'].max() <= 2
    # mass (zero mean height) survives float32
    assert tr.fields['height'].mean((-2, -1)).abs().max() < 1e-6
    # reproducible with a seed, different with another
    again = sys_.simulate(3, res=16, steps=4, seed=7, progress=False)
    assert torch.equal(again.fields['height'], tr.fields['height'])
    other = sys_.simulate(3, res=16, steps=4, seed=8, progress=False)
    assert not torch.equal(other.fields['height'], tr.fields['height'])
    ood = sys_.sample_params(200, 'ood', torch.Generator().manual_seed(0))
    assert ood['coriolis'].min() >= 4 and ood['coriolis'].max() <= 8
    amp = sys_.sample_params(200, 'ood_amplitude')['amplitude']
    assert amp.min() >= 0.3 and amp.max() <= 0.4
    fixed = sys_.simulate(2, res=16, steps=1, params={'coriolis': 5., 'amplitude': [0.1, 0.2]}, progress=False)
    assert fixed.scalars['coriolis'].tolist() == [5., 5.]
    with pytest.raises(ValueError, match="is not one of 'gravity_waves', 'geostrophic_adjustment', 'balanced_vortices'"):
        sys_.simulate(1, res=16, steps=1, ic='tsunami', progress=False)
    with pytest.raises(ValueError, match="is not one of 'id', 'ood', 'ood_amplitude'"):
        sys_.simulate(1, res=16, steps=1, param_split='test', progress=False)
    with pytest.raises(ValueError, match='outside its allowed range'):
        sys_.simulate(1, res=16, steps=1, params={'coriolis': 20.}, progress=False)


def test_shallow_water_refuses_a_dry_bottom():
    "amplitude ≤ 0.5 keeps H + h ≥ H/2 at t = 0; a fluid that runs dry later stops with a clear error."
    sw = ShallowWater(depth=1.)
    tr = sw.simulate(3, res=16, steps=1, params={'amplitude': 0.5}, progress=False)
    assert tr.fields['height'][:, 0].min() >= -0.5 - 1e-6
    dry = ShallowWater()
    def deep_hole(grid, coriolis, amplitude, ic, generator=None):
        h = -1.5 * torch.exp(-((grid.X.cpu() - 3)**2 + (grid.Y.cpu() - 3)**2))[None].expand(len(ic), -1, -1)
        return h, at_rest(h)
    dry.initial_condition = deep_hole
    with pytest.raises(ValueError, match='below the bottom'):
        dry.simulate(1, res=16, steps=1, progress=False)


def test_shallow_water_initial_conditions():
    sys_ = ShallowWater()
    g = sys_.grid(32)
    gen = torch.Generator().manual_seed(0)
    n = 12
    f = torch.linspace(0, 8, n, dtype=F64)
    amp = torch.full((n,), 0.2, dtype=F64)
    for fam in sys_.ic_families:
        h, vel = sys_.initial_condition(g, f, amp, [fam] * n, gen)
        assert h.mean((-2, -1)).abs().max() < 1e-14                    # zero-mean height: H is the mean depth
        peak = h.abs().amax((-2, -1))
        size = torch.maximum(peak, vel.norm(dim=-1).amax((-2, -1)))    # g = H = 1
        torch.testing.assert_close(size, amp)                           # the amplitude parameter is exact
        assert (peak[f > 0] > 0.01).all()
        if fam == 'balanced_vortices':
            sw = ShallowWaterSolver(g, f)
            s = sw.to_spectral(h, vel)
            # balanced: the linear tendency of (u, v) nearly vanishes relative to its parts
            gh = torch.stack([g.ifft(g.ddx(g.fft(h))), g.ifft(g.ddy(g.fft(h)))], -1)
            cor = f[:, None, None, None] * torch.stack([-vel[..., 1], vel[..., 0]], -1)
            assert (cor + gh).abs().max() < 1e-10 * max(1e-3, gh.abs().max())
            assert peak[0] == 0                                         # f = 0: a flat, moving vortex
        else:
            assert vel.abs().max() == 0


def test_shallow_water_float32_tracks_float64():
    sys_ = ShallowWater()
    a = sys_.simulate(2, res=32, steps=10, seed=3, dtype=torch.float32, progress=False)
    b = sys_.simulate(2, res=32, steps=10, seed=3, dtype=torch.float64, progress=False)
    h32, h64 = a.fields['height'].double(), b.fields['height']
    assert ((h32 - h64).norm() / h64.norm()) < 1e-4


# ------------------------------------------------------------------------------------------------
# acoustics
# ------------------------------------------------------------------------------------------------

def cell_grid(n, length=2.):
    dx = length / n
    x = -length / 2 + (torch.arange(n, dtype=F64) + 0.5) * dx
    X, Y = torch.meshgrid(x, x, indexing='ij')
    return dx, X, Y


@pytest.mark.parametrize('order', [2, 4])
def test_staggered_differences_are_negative_adjoints(order):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 12, 10, generator=gen, dtype=F64)
    for dim in (-2, -1):
        lhs = (b * staggered_difference(a, dim, 'face', order)).sum()
        rhs = -(a * staggered_difference(b, dim, 'centre', order)).sum()
        assert abs(lhs - rhs) < 1e-12


@pytest.mark.parametrize('order', [2, 4])
def test_staggered_differences_have_their_order(order):
    errs = []
    for n in (32, 64):
        dx = 2 * math.pi / n
        x = torch.arange(n, dtype=F64) * dx
        f = torch.sin(x)[:, None].expand(n, 3)
        face = staggered_difference(f, -2, 'face', order) / dx           # at x + dx/2
        errs.append((face - torch.cos(x + dx / 2)[:, None]).abs().max().item())
    assert abs(math.log2(errs[0] / errs[1]) - order) < 0.1


@pytest.mark.parametrize('order', [2, 4])
def test_acoustic_shadow_energy_is_conserved_to_round_off(order):
    "Störmer–Verlet on the staggered grid conserves E − dt²/8 Σ|∇p|²/ρ exactly, even across a density jump of e^10."
    dx, X, Y = cell_grid(40)
    gen = torch.Generator().manual_seed(2)
    rho = density_field(SpectralGrid2D(40, lx=2., x0=-1 + dx / 2), ['inclusions', 'smoothed_noise'],
                        torch.tensor([7., 30.]), gen)
    p0 = pressure_sources(SpectralGrid2D(40, lx=2., x0=-1 + dx / 2), ['pressure_rings', 'gaussian_pulses'], gen)
    ac = AcousticsSolver(rho, torch.tensor([4., 2.5]), dx, order)
    dt = 0.9 * ac.max_stable_dt()                                      # (B,), close to each limit on purpose
    z = torch.zeros_like(p0)
    S0 = ac.shadow_energy(p0, z, z, dt)
    p, u, v = ac.advance(p0, z, z, dt, 300)
    assert ((ac.shadow_energy(p, u, v, dt) - S0).abs() / S0).max() < 1e-13
    assert p.abs().max() < 10 * p0.abs().max()                         # stable


def test_acoustic_trajectories_do_not_depend_on_their_batch_mates():
    "Per-trajectory dt and step counts: a trajectory run alone or beside a much faster medium gives the same numbers."
    dx, X, Y = cell_grid(24)
    rho = torch.stack([1 + 3 * torch.exp(-(X**2 + Y**2) / 0.1), torch.full_like(X, 0.4)])   # c_max 2 vs 3.2
    p0 = torch.exp(-((X + 0.4)**2 + (Y - 0.1)**2) / 0.02)[None].expand(2, -1, -1)
    z = torch.zeros_like(p0)
    both = AcousticsSolver(rho, 4., dx)
    n = torch.ceil(0.05 / (0.5 * both.max_stable_dt())).long()
    assert n[0] < n[1]
    p2, u2, v2 = both.advance(p0, z, z, 0.05 / n.double(), n)
    alone = AcousticsSolver(rho[:1], 4., dx)
    p1, u1, v1 = alone.advance(p0[:1], z[:1], z[:1], 0.05 / float(n[0]), int(n[0]))
    assert torch.equal(p1, p2[:1]) and torch.equal(u1, u2[:1]) and torch.equal(v1, v2[:1])


def test_acoustic_energy_oscillation_is_second_order_and_does_not_drift():
    dx, X, Y = cell_grid(32)
    rho = (1 + 3 * torch.exp(-((X - 0.3)**2 + Y**2) / 0.05))[None]
    p0 = torch.exp(-((X + 0.4)**2 + (Y - 0.1)**2) / 0.02)[None]
    z = torch.zeros_like(p0)
    ac = AcousticsSolver(rho, 4., dx)
    devs = []
    for dt in (0.4 * float(ac.max_stable_dt()), 0.2 * float(ac.max_stable_dt())):
        E0, p, u, v, dev = ac.energy(p0, z, z), p0, z, z, 0.
        n = math.ceil(0.05 / dt)
        for _ in range(round(3. / (n * dt))):
            p, u, v = ac.advance(p, u, v, dt, n)
            dev = max(dev, ((ac.energy(p, u, v) - E0).abs() / E0).item())
        devs.append(dev)
    assert devs[0] < 1e-2 and 3.5 < devs[0] / devs[1] < 4.5, devs


@pytest.mark.parametrize('order', [2, 4])
def test_acoustic_standing_wave_matches_the_discrete_dispersion_relation(order):
    "Constant ρ: p = p₀ cos(ω t) cos(k·x) exactly, with ω the scheme's own discrete frequency."
    K, rho = 4., 1.3
    c = math.sqrt(K / rho)
    for n in (16, 32):
        dx, X, Y = cell_grid(n)
        for k, l in [(math.pi, 0.), (2 * math.pi, math.pi), (3 * math.pi, 2 * math.pi)]:
            p0 = torch.cos(k * X + l * Y)[None]
            ac = AcousticsSolver(torch.full_like(p0, rho), K, dx, order)
            dt = 0.45 * dx / c
            steps = 200
            p, u, v = ac.advance(p0, torch.zeros_like(p0), torch.zeros_like(p0), dt, steps)
            omega = acoustic_frequency(k, l, c, dx, dt, order)
            assert (p - p0 * math.cos(omega * steps * dt)).abs().max() < 1e-12


def test_acoustic_standing_wave_converges_to_the_analytic_one():
    "Constant ρ: p̂(k, t) = p̂₀ cos(c|k|t) in the continuum; the scheme converges at 2nd order (leapfrog, dt ∝ dx)."
    K, rho, (k, l), T = 4., 2., (2 * math.pi, math.pi), 1.
    c = math.sqrt(K / rho)
    errs = {2: [], 4: []}
    for order in (2, 4):
        for n in (32, 64, 128):
            dx, X, Y = cell_grid(n)
            p0 = torch.cos(k * X + l * Y)[None]
            ac = AcousticsSolver(torch.full_like(p0, rho), K, dx, order)
            steps = math.ceil(T / (0.3 * dx / c)); dt = T / steps
            p, _, _ = ac.advance(p0, torch.zeros_like(p0), torch.zeros_like(p0), dt, steps)
            errs[order].append((p - p0 * math.cos(c * math.hypot(k, l) * T)).abs().max().item())
    for order, e in errs.items():
        assert 1.8 < math.log2(e[-2] / e[-1]) < 2.6, (order, e)
    assert errs[4][-1] < errs[2][-1] / 2                               # 4th-order space helps at fixed dt/dx
    assert errs[4][-1] < 1e-3


def test_density_families():
    dx = 2 / 48
    g = SpectralGrid2D(48, lx=2., x0=-1 + dx / 2)
    gen = torch.Generator().manual_seed(5)
    fams = list(DENSITY_FAMILIES) * 6
    C = torch.tensor([7.] * 15 + [30.] * 15, dtype=F64)
    rho = density_field(g, fams, C, gen)
    assert rho.shape == (30, 48, 48) and rho.min() > 0
    for i, fam in enumerate(fams):
        if fam != 'inclusions':
            assert rho[i].min() >= 1 - 1e-12 and rho[i].max() <= C[i] + 1e-9, fam
    assert rho[[i for i, f in enumerate(fams) if f == 'constant']].std((-2, -1)).max() == 0
    assert max(float(rho[i].max()) for i, f in enumerate(fams) if f == 'inclusions') > 100
    with pytest.raises(ValueError, match="is not one of 'constant'"):
        density_field(g, ['marble'], torch.tensor([7.]), gen)


def test_acoustics_simulate_api_and_mean_pressure():
    sys_ = Acoustics()
    tr = sys_.simulate(4, res=24, steps=6, seed=0, progress=False)
    assert list(tr.fields) == ['pressure', 'velocity'] and set(tr.constant_fields) == {'density', 'speed_of_sound'}
    assert tr.fields['pressure'].shape == (4, 7, 24, 24) and tr.fields['velocity'].shape == (4, 7, 24, 24, 2)
    assert tr.constant_fields['density'].shape == (4, 24, 24)
    assert all(m in Acoustics.smooth_media for m in tr.attrs['density'])
    assert tr.attrs['ic'] == ['pressure_rings', 'gaussian_pulses'] * 2
    torch.testing.assert_close(tr.scalars['bulk_modulus'], torch.full((4,), 4.))
    torch.testing.assert_close(tr.coords['x'][0], torch.tensor(-1 + 1 / 24))  # cell centres of [-1, 1)
    pm = tr.fields['pressure'].mean((-2, -1))
    assert (pm - pm[:, :1]).abs().max() < 1e-6                          # Σp is conserved exactly
    assert tr.fields['velocity'][:, 0].abs().max() == 0 and tr.fields['velocity'][:, -1].abs().max() > 0
    ood = sys_.simulate(2, res=24, steps=2, param_split='ood', progress=False)
    assert ood.attrs['density'] == ['inclusions'] * 2
    hi = sys_.simulate(2, res=24, steps=2, param_split='ood_contrast', progress=False)
    assert hi.scalars['density_contrast'].min() >= 20
    forced = sys_.simulate(2, res=24, steps=2, density='gradient', params={'bulk_modulus': 9.}, progress=False)
    assert forced.attrs['density'] == ['gradient'] * 2
    torch.testing.assert_close(forced.constant_fields['speed_of_sound'], (9. / forced.constant_fields['density']).sqrt())
    with pytest.raises(ValueError, match="density='glass' is not one of 'constant'"):
        sys_.simulate(1, res=24, steps=1, density='glass', progress=False)
    with pytest.raises(ValueError, match="is not one of 'pressure_rings', 'gaussian_pulses'"):
        sys_.simulate(1, res=24, steps=1, ic='plane_wave', progress=False)


def test_acoustics_float32_tracks_float64():
    sys_ = Acoustics()
    a = sys_.simulate(2, res=32, steps=10, seed=4, dtype=torch.float32, progress=False)
    b = sys_.simulate(2, res=32, steps=10, seed=4, dtype=torch.float64, progress=False)
    assert ((a.fields['pressure'].double() - b.fields['pressure']).norm() / b.fields['pressure'].norm()) < 1e-5


# ------------------------------------------------------------------------------------------------
# registry, plots, devices
# ------------------------------------------------------------------------------------------------

def test_registry_and_animation():
    assert set(SYSTEMS) == {'shallow_water', 'acoustics'}
    for name, s in SYSTEMS.items():
        assert s.name == name and {'id', 'ood'} <= set(s.param_splits)
        for p in s.params.values(): assert p.doc
    tr = SYSTEMS['shallow_water'].simulate(1, res=16, steps=3, progress=False)
    fig = animate(tr, 'velocity')
    assert len(fig.frames) == 4 and fig.layout.sliders


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('name', ['shallow_water', 'acoustics'])
def test_cuda_matches_cpu(name):
    s = SYSTEMS[name]
    cpu = s.simulate(2, res=32, steps=5, seed=1, dtype=F64, progress=False)
    gpu = s.simulate(2, res=32, steps=5, seed=1, dtype=F64, device='cuda', progress=False)
    for k, v in cpu.fields.items():
        assert gpu.fields[k].device.type == 'cuda'
        torch.testing.assert_close(gpu.fields[k].cpu(), v, rtol=1e-9, atol=1e-11)
