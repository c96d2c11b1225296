"physnb.models.lejepa and physnb.train.lejepa: views are exact symmetries, loss errors and collapse, probe, Spearman vs scipy, DDP = one process, papermill."
import json, math, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from physnb.core import load_checkpoint
from physnb.models.lejepa import (GlobalBatchNorm, LeJEPA, LeJEPAConfig, EncoderConfig, PhysicsViews,
                                  ViewConfig, apply_d4, component_letters, d4_channel_map, lejepa_loss)
from physnb.train.lejepa import rankdata, ridge_probe, spearman, loss_error_correlation
from physnb.sim.systems import SYSTEMS
from physnb.models.sigreg import SIGReg
from _launch import torchrun

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PHYSNB_PROGRESS': '0', 'PYTHONPATH': str(ROOT)}
FLOW = ['velocity_x', 'velocity_y', 'vorticity']
ELEMENTS = [(f, k) for f in (False, True) for k in range(4)]


def _grad(f):
    n = f.shape[0]; k = torch.fft.fftfreq(n, 1 / n, dtype=torch.float64) * 2 * math.pi
    fh = torch.fft.fft2(f)
    return torch.fft.ifft2(1j * k[:, None] * fh).real, torch.fft.ifft2(1j * k[None, :] * fh).real


def _flow(psi):
    "(u_x, u_y, ω) of a periodic stream function, channels first (3, X, Y)."
    dx, dy = _grad(psi); ux, uy = dy, -dx
    return torch.stack([ux, uy, _grad(uy)[0] - _grad(ux)[1]])


def _psi(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.fft.fftfreq(n, 1 / n, dtype=torch.float64)
    return torch.fft.ifft2(torch.randn(n, n, dtype=torch.complex128, generator=g) * torch.exp(-(k[:, None]**2 + k[None]**2) / 8)).real


def test_component_letters_read_the_well_channel_names():
    assert [component_letters(n) for n in ['A', 'velocity_x', 'velocity_y', 'stress_xy', 'vorticity', 'x']] == ['', 'x', 'y', 'xy', '', '']


def test_x_flip_negates_x_components_and_the_pseudoscalar_vorticity():
    perm, signs = d4_channel_map(['velocity_x', 'velocity_y', 'vorticity', 'tracer'], flip=True, quarter_turns=0)
    assert perm == [0, 1, 2, 3] and signs.tolist() == [-1, 1, -1, 1]
    perm, signs = d4_channel_map(['velocity_x', 'velocity_y', 'vorticity'], flip=False, quarter_turns=1)
    assert perm == [1, 0, 2] and signs.tolist() == [-1, 1, 1]                      # u'_x = -u_y, u'_y = u_x, ω' = ω
    perm, signs = d4_channel_map(['s_xx', 's_xy', 's_yx', 's_yy'], flip=False, quarter_turns=1)
    assert perm == [3, 2, 1, 0] and signs.tolist() == [1, -1, -1, 1]               # T' = R T Rᵀ


@pytest.mark.parametrize('flip,turns', ELEMENTS)
def test_d4_maps_velocity_and_vorticity_of_psi_to_those_of_the_transformed_psi(flip, turns):
    "u = curl(ψ e_z) and ω = curl u: transforming (u, ω) equals computing them from the transformed ψ (a pseudoscalar)."
    psi = _psi()
    psi_g = apply_d4(psi[None], ['psi'], flip, turns)[0] * (-1 if flip else 1)
    torch.testing.assert_close(apply_d4(_flow(psi), FLOW, flip, turns), _flow(psi_g), atol=1e-10, rtol=0)


def test_d4_and_roll_commute_with_the_gray_scott_solver():
    gs = SYSTEMS['gray_scott']; grid = gs.grid(32)
    F, k = torch.tensor([0.029], dtype=torch.float64), torch.tensor([0.057], dtype=torch.float64)
    state = gs.initial_condition(grid, F, k, ['gaussians'], torch.Generator().manual_seed(1))
    step = gs.stepper(grid, F, k, gs.dt)
    evolve = lambda s: grid.ifft(step(grid.fft(s), 10))
    for flip, turns in ELEMENTS:
        act = lambda s: apply_d4(torch.roll(s, (5, -3), dims=(-2, -1)), ['A', 'B'], flip, turns)   # (1, 2, X, Y)
        torch.testing.assert_close(evolve(act(state)), act(evolve(state)), atol=1e-12, rtol=0)


def test_quarter_turn_without_the_partner_component_is_an_error():
    with pytest.raises(ValueError, match="partner 'velocity_y'"):
        apply_d4(torch.zeros(1, 4, 4), ['velocity_x'], quarter_turns=1)
    with pytest.raises(ValueError, match='channels'):
        apply_d4(torch.zeros(2, 4, 4), ['A'])


def test_view_shapes_time_offsets_and_frames():
    "Frame t of the window holds the value t everywhere: each view's frames are consecutive and inside the window."
    T, N = 5, 3
    window = torch.arange(T, dtype=torch.float32).view(1, T, 1, 1, 1).expand(N, T, 2, 16, 16).clone()
    views = PhysicsViews(ViewConfig(n_global=2, n_local=3, local_size=8, frames=2, noise=0.0), ['A', 'B'], seed=3)
    seen = set()
    for step in range(20):
        glob, loc = views(window, torch.arange(N), step)
        assert glob.shape == (2, N, 4, 16, 16) and loc.shape == (3, N, 4, 8, 8)
        for v in torch.cat([glob.flatten(0, 1).mean((-2, -1)), loc.flatten(0, 1).mean((-2, -1))]):   # (4,) = (f0 A, f0 B, f1 A, f1 B)
            t0, t1 = v[0].item(), v[2].item()
            assert v[1] == t0 and v[3] == t1 and t1 == t0 + 1 and 0 <= t0 <= T - 2
            seen.add(int(t0))
    assert seen == set(range(T - 1))                                                  # every offset gets drawn


def test_views_are_a_function_of_seed_step_and_index_only():
    x = torch.randn(4, 3, 3, 16, 16)
    views = PhysicsViews(ViewConfig(n_global=2, n_local=2, local_size=8, noise=0.1), FLOW, seed=1)
    a, la = views(x, torch.tensor([10, 11, 12, 13]), 7)
    b, lb = views(x[[2, 0]], torch.tensor([12, 10]), 7)
    torch.testing.assert_close(b, a[:, [2, 0]]); torch.testing.assert_close(lb, la[:, [2, 0]])
    c, _ = views(x, torch.tensor([10, 11, 12, 13]), 8)
    assert not torch.equal(a, c)


def test_bad_view_inputs_are_clear_errors():
    views = PhysicsViews(ViewConfig(local_size=32), ['A', 'B'])
    with pytest.raises(ValueError, match=r'\(N, T, C, X, Y\)'): views(torch.zeros(2, 2, 16, 16), torch.arange(2))
    with pytest.raises(ValueError, match='channels'): views(torch.zeros(2, 1, 3, 16, 16), torch.arange(2))
    with pytest.raises(ValueError, match='must not exceed'): views(torch.zeros(2, 1, 2, 16, 16), torch.arange(2))


def test_loss_errors_name_the_problem():
    sig = SIGReg(num_slices=16)
    with pytest.raises(ValueError, match='at least 2 samples'): lejepa_loss(torch.randn(2, 1, 4), 1, sigreg=sig)
    with pytest.raises(FloatingPointError, match='NaN/inf'): lejepa_loss(torch.full((2, 4, 4), float('inf')), 1, sigreg=sig)
    with pytest.raises(ValueError, match=r'\(V, N, K\)'): lejepa_loss(torch.randn(4, 4), 1, sigreg=sig)
    with pytest.raises(ValueError, match='n_global=3'): lejepa_loss(torch.randn(2, 4, 4), 3, sigreg=sig)
    with pytest.raises(ValueError, match='lam='): lejepa_loss(torch.randn(2, 4, 4), 1, lam=1.5, sigreg=sig)


def test_collapse_is_penalised_in_proportion_to_the_batch():
    sig = SIGReg(num_slices=256).eval()
    for n in (256, 1024):
        out = lejepa_loss(torch.zeros(2, n, 8), 2, 0.05, sig)              # z ≡ 0: T = N·Σ w_k (1 - φ(t_k))² ≈ 0.402 N
        assert out['prediction'] == 0 and out['sigreg'].item() == pytest.approx(0.402 * n, rel=0.01)
    g = torch.Generator().manual_seed(0)
    gauss = lejepa_loss(torch.randn(1, 1024, 8, generator=g).expand(3, 1024, 8), 1, 0.05, sig)
    assert gauss['prediction'] == 0 and 0.5 < gauss['sigreg'] < 2.0                  # the O(1) null level (≈ 1.05 on average)
    # the prediction term is the per-dimension mean squared distance to the global-view centre
    z = torch.randn(3, 16, 4)
    out = lejepa_loss(z, 2, 0.0, sig)
    torch.testing.assert_close(out['prediction'], ((z[:2].mean(0) - z) ** 2).mean()); torch.testing.assert_close(out['loss'], out['prediction'])


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip('scipy.stats')
    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 30):
        x = torch.randint(0, 6, (n,), generator=g).double(); y = x + torch.randint(0, 4, (n,), generator=g).double()
        if len(set(x.tolist())) < 2 or len(set(y.tolist())) < 2: continue
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
        torch.testing.assert_close(rankdata(x), torch.from_numpy(stats.rankdata(x.numpy())).double())
    assert math.isnan(spearman([2, 2, 2], [1, 2, 3]))
    with pytest.raises(ValueError, match='same length'): spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match='at least 2'): spearman([1], [1])
    c = loss_error_correlation([dict(final_loss=l, lam=lam, probe_error=e) for l, lam, e in [(1., .1, .1), (2., .1, .2), (3., .5, .3)]])
    assert c['rho_plain'] == 1.0 and c['n'] == 3


def test_probe_recovers_a_known_linear_map():
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(10, 2, generator=g, dtype=torch.float64), torch.tensor([0.03, 0.06], dtype=torch.float64)
    Xtr, Xte = torch.randn(60, 10, generator=g, dtype=torch.float64), torch.randn(30, 10, generator=g, dtype=torch.float64)
    for groups in (None, torch.arange(60) // 4):
        res = ridge_probe(Xtr, Xtr @ A + b, Xte, Xte @ A + b, ['F', 'k'], groups=groups)
        assert min(res['r2'].values()) > 1 - 1e-6 and max(res['rel_error'].values()) < 1e-3
    noise = ridge_probe(Xtr, torch.randn(60, 2, generator=g, dtype=torch.float64), Xte, torch.randn(30, 2, generator=g, dtype=torch.float64))
    assert noise['alpha'] >= 10 and max(noise['r2'].values()) < 0.2                 # pure noise: a large ridge, no skill
    const = ridge_probe(Xtr, Xtr[:, :2], Xte, torch.stack([Xte[:, 0], torch.full((30,), 0.5, dtype=torch.float64)], 1), ['F', 'k'])
    assert math.isnan(const['r2']['k']) and math.isfinite(const['nmse']['k'])      # R² is undefined for a constant test target
    with pytest.raises(FloatingPointError, match='non-finite'): ridge_probe(Xtr * float('nan'), Xtr[:, :2], Xte, Xte[:, :2])
    with pytest.raises(ValueError, match='2-D'): ridge_probe(Xtr[0], Xtr[:, :2], Xte, Xte[:, :2])


def test_global_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    ours, ref = GlobalBatchNorm(6), torch.nn.BatchNorm1d(6)
    with torch.no_grad(): ours.weight.uniform_(); ref.weight.copy_(ours.weight)
    x = torch.randn(32, 6) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var); torch.testing.assert_close(ours.running_mean, ref.running_mean)
    ours.eval(); ref.eval(); torch.testing.assert_close(ours(x), ref(x))


def test_lejepa_model_forward_and_step():
    model = LeJEPA(LeJEPAConfig(encoder=EncoderConfig(width=4, embed_dim=8, stages=2), views=ViewConfig(n_local=2, local_size=8),
                                proj_hidden=16, proj_dim=4, num_slices=8), ['A', 'B'])
    out = model(torch.randn(4, 3, 2, 16, 16), torch.arange(4))
    assert set(out) == {'loss', 'prediction', 'sigreg'} and torch.isfinite(out['loss'])
    out['loss'].backward()
    assert model.step.item() == 1 and model.encoder.head.weight.grad is not None


# ---------------------------------------------------------------- DDP under torchrun and the papermill run
def _dataset(tmp_path):
    from physnb.data.generate import generate_dataset
    return generate_dataset(SYSTEMS['gray_scott'], tmp_path / 'data', 8, res=16, steps=5, seed=0, fractions=(0.5, 0.25, 0.25),
                            param_split='all', progress=False)['root']


ARGS = ['--epochs', '2', '--batch-size', '8', '--lr', '2e-3', '--width', '4', '--embed-dim', '16', '--proj-hidden', '32',
        '--num-slices', '32', '--window', '3', '--n-local', '2', '--local-size', '8', '--device', 'cpu']


@pytest.mark.slow
def test_ddp_under_torchrun_matches_one_process(tmp_path):
    "2 gloo ranks (4 samples each) reach the same weights as one process on the same global batches of 8."
    data = _dataset(tmp_path)
    one = subprocess.run([sys.executable, '-m', 'physnb.cli', 'lejepa', '--data', str(data), '--out-dir', str(tmp_path / 'one'), *ARGS],
                         env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(torchrun() + ['-m', 'physnb.cli', 'lejepa', '--data', str(data), '--out-dir', str(tmp_path / 'two'), *ARGS],
                         env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    if two.returncode != 0 and 'physnb' not in two.stderr: pytest.skip(f'torchrun could not start: {two.stderr[-500:]}')
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = (json.loads((tmp_path / d / 'results.json').read_text())['metrics'] for d in ('one', 'two'))
    assert (r1['world_size'], r2['world_size']) == (1, 2)
    w1, w2 = (load_checkpoint(tmp_path / d / 'last.safetensors')['model'] for d in ('one', 'two'))
    assert w1.keys() == w2.keys() and w1['step'].item() == w2['step'].item() == r1['history'][-1]['step']
    for name, tensor in w1.items():
        torch.testing.assert_close(w2[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for h1, h2 in zip(r1['history'], r2['history']):
        assert h1['train_loss'] == pytest.approx(h2['train_loss'], rel=1e-4)
    assert set(r1['probe']['r2']) == {'F', 'k'}


@pytest.mark.slow
def test_notebook_runs_under_papermill_and_writes_results(tmp_path):
    papermill = pytest.importorskip('papermill')
    out_dir = tmp_path / 'runs'
    os.environ.setdefault('OMP_NUM_THREADS', '1'); os.environ['PHYSNB_PROGRESS'] = '0'
    papermill.execute_notebook(str(ROOT / 'nbs' / '09b_lejepa_study.ipynb'), str(tmp_path / 'executed.ipynb'), cwd=str(ROOT / 'nbs'),
                               parameters=dict(res=16, n_traj=12, steps=5, window=3, epochs=2, batch_size=8, width=4, embed_dim=16,
                                               n_local=1, num_slices=32, sweep_size=3, out_dir=str(out_dir)),
                               progress_bar=False, kernel_name='python3')
    saved = json.loads((out_dir / 'results.json').read_text())
    assert saved['schema'] == 'physnb.results/1' and saved['experiment'] == 'lejepa_study' and saved['parameters']['n_traj'] == 12
    assert {'probe.html', 'loss.html', 'sweep.html'} == set(saved['figures'])
    results = saved['metrics']
    assert set(results['probe']) == {'LeJEPA', 'random init', 'supervised'}
    assert all(math.isfinite(v) for r in results['probe'].values() for v in r['nmse'].values())
    assert len(results['sweep']) == 3 and results['correlation']['n'] == 3
    assert not list((ROOT / 'nbs').glob('**/results.json'))


def test_the_paper_recipe_runs_under_papermill(tmp_path):
    "-p recipe paper: no final BatchNorm, AdamW 5e-4 with warm-up and cosine to lr/1000, 6 local views, 1024 slices."
    papermill = pytest.importorskip('papermill')
    out_dir = tmp_path / 'runs'
    os.environ.setdefault('OMP_NUM_THREADS', '1'); os.environ['PHYSNB_PROGRESS'] = '0'
    papermill.execute_notebook(str(ROOT / 'nbs' / '09b_lejepa_study.ipynb'), str(tmp_path / 'executed.ipynb'), cwd=str(ROOT),
                               parameters=dict(res=16, n_traj=12, steps=5, window=3, epochs=2, width=4, embed_dim=16, sweep_size=0,
                                               batch_size=8, recipe='paper', out_dir=str(out_dir)), progress_bar=False, kernel_name='python3')
    saved = json.loads((out_dir / 'results.json').read_text())
    p = saved['parameters']
    assert (p['lr'], p['n_local'], p['num_slices'], p['protocol']['batch_size'], p['protocol']['proj_norm']) == (5e-4, 6, 1024, 128, False)
    lrs = [row['lr'] for row in saved['metrics']['parts']]                 # 24 windows, batch 8 (given): 3 steps an epoch
    assert lrs[:3] == pytest.approx([5e-4 / 3, 1e-3 / 3, 5e-4]) and min(lrs) >= 5e-7 * 0.999   # warm-up over one epoch, then cosine
    assert all(math.isfinite(v) for r in saved['metrics']['probe'].values() for v in r['nmse'].values())
    with pytest.raises(papermill.PapermillExecutionError, match="recipe choice 'optimiser' is not one of"):
        papermill.execute_notebook(str(ROOT / 'nbs' / '09b_lejepa_study.ipynb'), str(tmp_path / 'bad.ipynb'), cwd=str(ROOT),
                                   parameters=dict(recipe_overrides='optimiser:sgd', out_dir=str(tmp_path / 'bad')),
                                   progress_bar=False, kernel_name='python3')


def _table(notebook: str, header: str) -> list[list[str]]:
    for cell in json.loads((ROOT / 'nbs' / notebook).read_text())['cells']:
        lines = ''.join(cell['source']).splitlines()
        for i, line in enumerate(lines):
            if line.startswith(header):
                rows = []
                for row in lines[i + 2:]:
                    if not row.startswith('|'): break
                    rows.append([c.strip() for c in row.strip('|').split('|')])
                return rows
    raise AssertionError(f'{notebook}: no table starting {header!r}')


def _codes(cell: str) -> list[str]: return cell.split('`')[1::2]


def test_the_differences_tables_state_the_recipes_values():
    "09a's recipe table and 09b's differences table say what LEJEPA_RECIPES holds."
    from physnb.train.lejepa import LEJEPA_RECIPES
    rows = _table('09a_train.lejepa.ipynb', '| choice |')
    assert {_codes(r[0])[0] for r in rows} == set(LEJEPA_RECIPES['paper'])
    for choice, paper, kit, _ in rows:
        key = _codes(choice)[0]
        for text, preset in ((paper, 'paper'), (kit, 'kit')):
            assert _codes(text)[0] == str(LEJEPA_RECIPES[preset][key]), (key, preset, text)
    rows = {r[0]: r for r in _table('09b_lejepa_study.ipynb', '| what | paper |')}
    for what, keys in {'projector end': ['proj_norm'], 'optimiser': ['lr', 'warmup_epochs'], 'weight decay': ['weight_decay'],
                       'batch': ['batch_size'], 'views': ['n_local'], 'SIGReg slices': ['num_slices']}.items():
        for preset, column in (('paper', 1), ('kit', 2)):
            stated = _codes(rows[what][column])
            assert stated[:len(keys)] == [str(LEJEPA_RECIPES[preset][k]) for k in keys][:len(stated)] and stated, (what, preset, stated)
