"""Physics tests for physnb.sim.pdes that the notebook does not run: an independent-solver cross-check (py-pde),
CUDA agreement, the System API contract for every registered system, and slow data-quality checks."""
import math
import os
import subprocess
import sys

import pytest
import torch

from physnb.core import Trajectories, load_checkpoint
from physnb.sim.pdes import (ETDRK4, GRAY_SCOTT_REGIMES, GrayScott, NavierStokes2D, Param, SpectralGrid2D,
                             System, etdrk4_coefficients, random_vorticity)
from physnb.sim.systems import SYSTEMS as ALL_SYSTEMS
SYSTEMS = {n: s for n, s in ALL_SYSTEMS.items() if type(s).__module__ == 'physnb.sim.pdes'}   # the systems physnb.sim.pdes defines

torch.set_num_threads(1)
F64 = torch.float64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


# ------------------------------------------------------------------------------------------------
# cross-check against an independent solver (py-pde, 2nd-order finite differences)
# ------------------------------------------------------------------------------------------------

def _pypde(n, expression, rhs, t, length):
    pde = pytest.importorskip('pde')
    grid = pde.CartesianGrid([[0, length], [0, length]], [n, n], periodic=True)    # cell centres (i+½)·dx
    field = pde.ScalarField.from_expression(grid, expression)
    eq = pde.PDE({'u': rhs})
    return torch.from_numpy(eq.solve(field, t_range=t, dt=1e-3, solver='scipy', rtol=1e-9, atol=1e-11,
                                     backend='numpy', tracker=None).data)


@pytest.mark.oracle
def test_heat_equation_agrees_with_pypde_at_second_order():
    "Same cell-centred grid, same IC: the FD–spectral difference is py-pde's O(dx²) error (ours is exact)."
    length, nu, t = 2 * math.pi, 0.2, 1.0
    diffs = []
    for n in (32, 64):
        g = SpectralGrid2D(n, lx=length, dtype=F64, x0=length / n / 2, y0=length / n / 2)   # py-pde's points
        u0 = torch.sin(g.X) * torch.cos(2 * g.Y) + 0.5 * torch.cos(3 * g.X + g.Y)
        ours = g.ifft(ETDRK4(-nu * g.k2, t / 4, torch.zeros_like)(g.fft(u0), 4))
        exact = (torch.sin(g.X) * torch.cos(2 * g.Y) * math.exp(-5 * nu * t)
                 + 0.5 * torch.cos(3 * g.X + g.Y) * math.exp(-10 * nu * t))
        assert (ours - exact).abs().max() < 1e-13
        theirs = _pypde(n, 'sin(x)*cos(2*y) + 0.5*cos(3*x + y)', f'{nu}*laplace(u)', t, length)
        diffs.append(((theirs - ours).norm() / ours.norm()).item())
    assert diffs[1] < 6e-3, diffs                                          # measured 4.3e-3 (32²: 1.7e-2)
    assert diffs[0] / diffs[1] > 3.5, diffs                                # second order: ratio → 4


@pytest.mark.oracle
def test_reaction_diffusion_agrees_with_pypde_at_second_order():
    "Nonlinear diffusion-type problem u_t = 0.1Δu + u − u³: FD–spectral difference shrinks ≈ 4× per grid doubling."
    length, t = 2 * math.pi, 1.0
    diffs = []
    for n in (32, 64):
        g = SpectralGrid2D(n, lx=length, dtype=F64, x0=length / n / 2, y0=length / n / 2)
        u0 = 0.6 * torch.sin(g.X) * torch.cos(2 * g.Y) + 0.4 * torch.cos(3 * g.X + g.Y)
        stepper = ETDRK4(-0.1 * g.k2 + 1., t / 64, lambda uh: -g.fft(g.ifft(uh)**3))
        ours = g.ifft(stepper(g.fft(u0), 64))
        theirs = _pypde(n, '0.6*sin(x)*cos(2*y) + 0.4*cos(3*x + y)', '0.1*laplace(u) + u - u**3', t, length)
        diffs.append(((theirs - ours).norm() / ours.norm()).item())
    assert diffs[1] < 5e-3 and diffs[0] / diffs[1] > 3.5, diffs


# ------------------------------------------------------------------------------------------------
# the System contract, for every registered system
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(SYSTEMS))
def test_system_contract(name):
    system = SYSTEMS[name]
    assert isinstance(system, System) and system.name == name
    assert {'id', 'ood'} <= set(system.param_splits) and system.ic_families
    assert all(isinstance(p, Param) for p in system.params.values())
    for split in system.param_splits:
        draws = system.sample_params(5, split, torch.Generator().manual_seed(0))
        assert set(draws) == set(system.params)
        for k, v in draws.items():
            assert v.shape == (5,) and v in system.params[k], (split, k, v)
    for ic in system.ic_families:
        traj = system.simulate(2, res=16, steps=2, ic=ic, progress=False)
        assert isinstance(traj, Trajectories) and traj.n_traj == 2 and traj.n_steps == 3
        assert set(traj.scalars) == set(system.params)
        assert all(v.dtype == torch.float32 for v in traj.fields.values())
        traj.validate()


@pytest.mark.parametrize('name', list(SYSTEMS))
def test_simulate_is_reproducible_from_the_seed(name):
    a, b, c = (SYSTEMS[name].simulate(2, res=16, steps=1, seed=s, progress=False) for s in (3, 3, 4))
    for k in a.fields:
        assert torch.equal(a.fields[k], b.fields[k])
    assert any(not torch.equal(a.fields[k], c.fields[k]) for k in a.fields)


_SIMULATE_AND_SAVE = """
import sys, torch
from physnb.core import save_checkpoint
from physnb.sim.systems import SYSTEMS
torch.set_num_threads(1)
gs = SYSTEMS['gray_scott'].simulate(2, res=16, steps=1, seed=0, progress=False)     # ic=None: both IC families
ns = SYSTEMS['ns2d'].simulate(2, res=16, steps=1, seed=0, ic='decaying', progress=False)
save_checkpoint(sys.argv[1], gray_scott=gs.fields, gray_scott_scalars=gs.scalars, ns2d=ns.fields, ns2d_scalars=ns.scalars)
"""


def test_same_seed_same_data_across_processes(tmp_path):
    "Python's string hashing differs between processes (PYTHONHASHSEED); the data of a seed must not."
    paths = []
    for hash_seed in ('0', '3'):                     # these two once gave different Gray–Scott ICs (set iteration order)
        path = tmp_path / f'hash{hash_seed}.safetensors'
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS='1', PHYSNB_PROGRESS='0')
        subprocess.run([sys.executable, '-c', _SIMULATE_AND_SAVE, str(path)], env=env, check=True, timeout=300)
        paths.append(path)
    a, b = (load_checkpoint(p) for p in paths)
    assert set(a) == set(b) == {'gray_scott', 'gray_scott_scalars', 'ns2d', 'ns2d_scalars'}
    for part in a:
        assert set(a[part]) == set(b[part]) and a[part]
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def _tensors(traj):
    "Every tensor a Trajectories carries, as (where, tensor)."
    yield 'time', traj.time
    for group in ('fields', 'coords', 'scalars', 'constant_fields'):
        for k, v in getattr(traj, group).items(): yield f'{group}[{k!r}]', v


@pytest.mark.parametrize('dtype', [torch.float32, F64])
@pytest.mark.parametrize('name', list(SYSTEMS))
def test_every_returned_tensor_has_the_requested_dtype(name, dtype):
    traj = SYSTEMS[name].simulate(2, res=16, steps=1, dtype=dtype, progress=False)
    for where, t in _tensors(traj):
        assert t.dtype == dtype and t.device.type == 'cpu', (where, t.dtype, t.device)


def test_id_and_ood_splits_do_not_overlap():
    gs, ns = GrayScott(), NavierStokes2D()
    assert not set(gs.param_splits['id']['regime']) & set(gs.param_splits['ood']['regime'])
    assert set(gs.param_splits['id']['regime']) | set(gs.param_splits['ood']['regime']) == set(GRAY_SCOTT_REGIMES)
    for p in ns.params:
        assert not set(ns.param_splits['id'][p]) & set(ns.param_splits['ood'][p])


def test_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="'shear', 'kolmogorov', 'decaying'"):
        SYSTEMS['ns2d'].simulate(1, res=16, steps=1, ic='vortex')
    with pytest.raises(ValueError, match='outside its allowed range'):
        SYSTEMS['ns2d'].simulate(1, res=16, steps=1, params={'Reynolds': 1e9})
    with pytest.raises(ValueError, match="'orszag', 'exponax'"):
        SpectralGrid2D(16).dealias_mask(rule='hou-li')


def test_cfl_controls_the_internal_step():
    "The adaptive step keeps Δt·max(|u|/Δx + |v|/Δy) at or below the CFL target at the start of each frame."
    ns = NavierStokes2D(cfl=0.5)
    traj = ns.simulate(2, res=32, steps=3, ic='decaying', params={'Reynolds': 1000.}, progress=False, dtype=F64)
    g = ns.grid(32, 'decaying')
    vel = traj.fields['velocity']
    rate = (vel[..., 0].abs() / g.dx + vel[..., 1].abs() / g.dy).amax(dim=(0, 2, 3))   # per frame
    assert traj.attrs['dt_max'] * rate[:-1].min() <= 0.5 + 1e-9
    assert traj.attrs['dt_min'] * rate[:-1].max() <= 0.5 + 1e-9


def test_float32_data_tracks_float64():
    "float32 (data) and float64 (tests) runs of the same trajectories agree to single-precision accuracy."
    ns = NavierStokes2D()
    a = ns.simulate(2, res=32, steps=4, ic='decaying', progress=False, dtype=torch.float32)
    b = ns.simulate(2, res=32, steps=4, ic='decaying', progress=False, dtype=F64)
    w32, w64 = a.fields['vorticity'].double(), b.fields['vorticity']
    assert ((w32 - w64).norm() / w64.norm()).item() < 1e-4


def test_etdrk4_coefficients_of_complex_L_keep_the_imaginary_part():
    L = torch.tensor([1j * 5., -2. + 3j], dtype=torch.complex128)
    c = etdrk4_coefficients(L, 0.1)
    assert c['f1'].is_complex() and c['f1'].imag.abs().min() > 1e-6
    z = L * 0.1
    torch.testing.assert_close(c['Q'], 0.1 * (torch.exp(z / 2) - 1) / z, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------

@cuda
@pytest.mark.parametrize('name', list(SYSTEMS))
def test_cuda_matches_cpu(name):
    "Same seed, float64: the GPU run reproduces the CPU run (ICs are drawn on the CPU)."
    cpu = SYSTEMS[name].simulate(2, res=32, steps=3, dtype=F64, progress=False)
    gpu = SYSTEMS[name].simulate(2, res=32, steps=3, dtype=F64, device='cuda', progress=False)
    for where, t in _tensors(gpu):
        assert t.device.type == 'cuda' and t.dtype == F64, (where, t.device, t.dtype)
    for k in cpu.fields:
        torch.testing.assert_close(gpu.fields[k].cpu(), cpu.fields[k], rtol=1e-9, atol=1e-9)
    for k in cpu.scalars:
        assert torch.equal(gpu.scalars[k].cpu(), cpu.scalars[k])


@cuda
@pytest.mark.parametrize('name', list(SYSTEMS))
def test_cuda_float32_run_lives_on_the_device(name):
    traj = SYSTEMS[name].simulate(2, res=16, steps=1, device='cuda', progress=False)
    for where, t in _tensors(traj):
        assert t.device.type == 'cuda' and t.dtype == torch.float32, (where, t.device, t.dtype)


# ------------------------------------------------------------------------------------------------
# slow data-quality checks
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_gray_scott_regimes_stay_bounded_and_patterned():
    "All six regimes at 64², 1000 time units, gaussian ICs: finite, bounded, and B keeps spatial structure."
    gs = GrayScott()
    traj = gs.simulate(6, res=64, steps=100, params={'F': [f for f, _ in GRAY_SCOTT_REGIMES.values()],
                                                     'k': [k for _, k in GRAY_SCOTT_REGIMES.values()]},
                       ic='gaussians', progress=False)
    B = traj.fields['B']
    assert B.min() > -0.1 and B.max() < 1.5                                # gaussian ICs start with A + B up to 2
    assert (B[:, -1].std(dim=(-2, -1)) > 0.02).all(), B[:, -1].std(dim=(-2, -1))


@pytest.mark.slow
@pytest.mark.parametrize('ic', ['shear', 'kolmogorov', 'decaying'])
def test_ns2d_id_runs_are_resolved_at_64(ic):
    "ID parameters at 64²: under 3% of the enstrophy sits in the last dealiased shell band (|n| in 16..21)."
    ns = NavierStokes2D()
    traj = ns.simulate(2, res=64, steps=20, ic=ic, params={'Reynolds': 2000., 'Schmidt': 1.}, progress=False, dtype=F64)
    g = ns.grid(64, ic)
    wh = g.fft(traj.fields['vorticity'][:, -1]).abs()**2
    kn = torch.sqrt((g.nkx * 64 / g.nx)**2 + (g.nky * 64 / g.ny)**2)
    band = (kn > 16) & (kn <= 21)
    assert (wh[:, band].sum() / wh.sum()).item() < 0.03
