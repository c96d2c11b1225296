"""physnb.models.sigreg: agreement with jepa-science 0.1.0 (the oracle; physnb never imports it), the chunked
characteristic-function autograd function, DDP over 2 gloo processes equals one process, dtypes, bad input,
and the statistical facts LeJEPA relies on."""
import math, os
from pathlib import Path

import pytest
import torch
from torch import nn

from physnb.models.sigreg import (UNIVARIATE_TESTS, CharacteristicSums, SIGReg, anderson_darling,
                                  cramer_von_mises, epps_pulley, epps_pulley_grid, jarque_bera, moments,
                                  sigreg, unit_directions, vcreg)

torch.set_num_threads(1)
NULL_MEAN = 1.0525        # Σ_k w_k (1 − φ_k²) on the default grid: E[T] for Gaussian data, any N
COLLAPSE = 0.4020         # Σ_k w_k (1 − φ_k)²: T/N for a collapsed batch


def _js():
    return pytest.importorskip('jepa_science', reason='jepa-science 0.1.0 is the oracle')


def _direct_sums(proj64, n_knots=17, t_max=3.0):
    "The naive N×M×T formula in float64: (2, B, T, M) sums of cos and sin."
    t = torch.linspace(0, t_max, n_knots, dtype=torch.float64)
    ph = proj64[..., None] * t
    return torch.stack([ph.cos().sum(-3), ph.sin().sum(-3)]).transpose(-1, -2)


def _direct_ep64(proj, n_knots=17, t_max=3.0):
    "Reference statistic in float64 straight from the formula (no recurrence, no chunks)."
    x = proj.double(); N = x.shape[-2]
    t, w = epps_pulley_grid(n_knots, t_max, dtype=torch.float64)
    ph = x[..., None] * t
    err = (ph.cos().mean(-3) - torch.exp(-t**2 / 2))**2 + ph.sin().mean(-3)**2
    return N * err @ w


# ------------------------------------------------------------------ the grid
def test_grid_is_the_official_folded_trapezoid():
    js = _js()
    t, w = epps_pulley_grid()
    t_js, w_js = js.epps_pulley_quadrature(17, 3.0)
    torch.testing.assert_close(t, t_js, rtol=0, atol=1e-6)
    torch.testing.assert_close(w, w_js, rtol=0, atol=1e-7)
    t, w = epps_pulley_grid(dtype=torch.float64)
    assert t.dtype == w.dtype == torch.float64
    assert abs((w * (1 - torch.exp(-t**2 / 2)**2)).sum().item() - NULL_MEAN) < 1e-4


def test_paper_grid_is_nine_folded_knots_on_0_5():
    "The paper's linspace(-5, 5, 17) trapezoid equals the folded grid epps_pulley_grid(9, 5.0)."
    f = lambda t: torch.cos(1.3 * t) * torch.exp(-t**2 / 2)
    t, w = epps_pulley_grid(9, 5.0, dtype=torch.float64)
    ts = torch.linspace(-5, 5, 17, dtype=torch.float64)
    torch.testing.assert_close((w * f(t)).sum(), torch.trapezoid(f(ts) * torch.exp(-ts**2 / 2), ts), rtol=1e-12, atol=1e-12)
    t_u, w_u = epps_pulley_grid(5, 2.0, window='uniform', dtype=torch.float64)
    torch.testing.assert_close(w_u, torch.tensor([0.5, 1.0, 1.0, 1.0, 0.5], dtype=torch.float64))


# ------------------------------------------------------------------ the autograd function
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 3e-6)])
@pytest.mark.parametrize('chunk', [1, 7, None])
def test_characteristic_sums_match_the_direct_formula(dtype, tol, chunk):
    g = torch.Generator().manual_seed(0)
    proj64 = 3 * torch.randn(2, 45, 6, generator=g, dtype=torch.float64)
    proj = proj64.to(dtype).clone().requires_grad_()
    sums = CharacteristicSums.apply(proj, 3.0 / 16, 17, chunk)
    torch.testing.assert_close(sums.double() / 45, _direct_sums(proj64) / 45, rtol=0, atol=tol)
    up = torch.randn(sums.shape, generator=g, dtype=torch.float64)
    (sums * up.to(dtype)).sum().backward()
    p = proj64.clone().requires_grad_()
    (_direct_sums(p) * up).sum().backward()
    torch.testing.assert_close(proj.grad.double(), p.grad, rtol=0, atol=tol * 50)


def test_characteristic_sums_gradcheck():
    g = torch.Generator().manual_seed(1)
    proj = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: CharacteristicSums.apply(p, 0.25, 6, 4), (proj,))


def test_recurrence_float32_accuracy_on_large_phases():
    "Rotation recurrence vs direct cos/sin in float32, for |x| up to 50 (phases up to 150 rad)."
    g = torch.Generator().manual_seed(2)
    proj64 = 50 * (2 * torch.rand(1, 1000, 8, generator=g, dtype=torch.float64) - 1)
    sums = CharacteristicSums.apply(proj64.float(), 3.0 / 16, 17, None).double() / 1000
    ref = _direct_sums(proj64) / 1000
    assert (sums - ref).abs().max() < 2e-6


# ------------------------------------------------------------------ agreement with jepa-science
def test_epps_pulley_agrees_with_jepa_science_values_and_grads():
    js = _js()
    from jepa_science.sigreg import _slice_statistics
    g = torch.Generator().manual_seed(3)
    t, w = js.epps_pulley_quadrature(17, 3.0)
    for scale, shift in ((1.0, 0.0), (2.0, 0.0), (0.7, 0.4), (0.01, 0.0)):
        proj = (scale * torch.randn(2, 300, 40, generator=g) + shift).requires_grad_()
        ours, theirs = epps_pulley(proj), _slice_statistics(proj, t, w)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        ref64 = _direct_ep64(proj.detach())
        # ours is at least as close to the float64 truth as the oracle is (up to float32 noise)
        assert (ours.double() - ref64).abs().max() <= 2 * (theirs.double() - ref64).abs().max() + 1e-5
        g1, = torch.autograd.grad(ours.sum(), proj)
        g2, = torch.autograd.grad(theirs.sum(), proj)
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_sigreg_step0_is_the_official_generator_recipe():
    js = _js()
    g = torch.Generator().manual_seed(4)
    z = 1.3 * torch.randn(256, 32, generator=g) + 0.2
    a = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(unit_directions(32, 128, step=0), a / a.norm(dim=0), rtol=0, atol=0)
    theirs = js.sigreg_loss(z, 128, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigreg(z, 128, step=0), theirs, rtol=1e-5, atol=1e-5)
    module = SIGReg(128)
    torch.testing.assert_close(module(z), theirs, rtol=1e-5, atol=1e-5)          # a fresh module is at step 0
    theirs7 = js.sigreg_loss(z, 128, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sigreg(z, 128, step=7), theirs7, rtol=1e-5, atol=1e-5)


def test_sigreg_module_agrees_with_jepa_science_on_given_directions():
    js = _js()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 200, 16, generator=g)                                   # leading batch dim
    A = unit_directions(16, 64, step=11, seed=3)
    ours = SIGReg(64, reduction='none')(z, directions=A)
    theirs = js.sigreg_loss(z, 64, reduction='none', generator=torch.Generator().manual_seed(0))   # only for shape
    assert ours.shape == theirs.shape == (3, 64)
    from jepa_science.sigreg import _slice_statistics
    t, w = js.epps_pulley_quadrature(17, 3.0)
    torch.testing.assert_close(ours, _slice_statistics(z @ A, t, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(SIGReg(64)(z, directions=A), ours.mean())


# ------------------------------------------------------------------ the module
def test_step_advances_in_training_mode_only_and_is_checkpointed():
    m = SIGReg(8)
    z = torch.randn(32, 4)
    m(z); m(z)
    assert int(m.step) == 2 and 'step' in m.state_dict()
    m.eval(); v1 = m(z); v2 = m(z)
    assert int(m.step) == 2 and v1 == v2
    torch.testing.assert_close(v1, sigreg(z, 8, step=2))
    fresh = SIGReg(8); fresh.load_state_dict(m.state_dict())
    assert int(fresh.step) == 2
    m.train(); m(z, directions=unit_directions(4, 8, 0))
    assert int(m.step) == 3


def test_directions_are_unit_and_seeded():
    A = unit_directions(10, 50, step=3, seed=5)
    torch.testing.assert_close(A.norm(dim=0), torch.ones(50))
    assert torch.equal(A, unit_directions(10, 50, step=3, seed=5))
    assert not torch.equal(A, unit_directions(10, 50, step=3, seed=6))
    assert not torch.equal(A, unit_directions(10, 50, step=4, seed=5))
    assert unit_directions(10, 5, 0, dtype=torch.float64).dtype == torch.float64


# ------------------------------------------------------------------ dtypes
def test_float64_stays_float64():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(100, 8, generator=g, dtype=torch.float64, requires_grad=True)
    A = unit_directions(8, 16, 0, dtype=torch.float64)
    v = sigreg(z, directions=A, reduction='none')
    assert v.dtype == torch.float64
    torch.testing.assert_close(v, _direct_ep64(z.detach() @ A), rtol=1e-12, atol=1e-12)
    v.sum().backward()
    assert z.grad.dtype == torch.float64
    assert epps_pulley(z).dtype == torch.float64


def test_bf16_and_autocast_compute_in_float32():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(512, 32, generator=g)
    fp32 = sigreg(z, 256).item()
    zb = z.bfloat16().requires_grad_()
    vb = sigreg(zb, 256)
    assert vb.dtype == torch.float32 and math.isfinite(vb.item()) and abs(vb.item() - fp32) < 0.01 * fp32
    vb.backward()
    assert zb.grad.dtype == torch.bfloat16 and torch.isfinite(zb.grad.float()).all()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        lin = nn.Linear(32, 32)
        nn.init.eye_(lin.weight); nn.init.zeros_(lin.bias)
        va = SIGReg(256)(lin(z))
    assert va.dtype == torch.float32 and abs(va.item() - fp32) < 0.01 * fp32
    assert epps_pulley(z[:, :5].half()).dtype == torch.float32


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize('call,match', [
    (lambda: epps_pulley(torch.randn(1, 5)), 'N >= 2'),
    (lambda: epps_pulley(torch.randn(5)), 'ndim >= 2'),
    (lambda: epps_pulley(torch.tensor([[1.0], [float('nan')]])), 'non-finite'),
    (lambda: epps_pulley(torch.tensor([[1.0], [float('inf')]])), 'non-finite'),
    (lambda: epps_pulley(torch.zeros(4, 3, dtype=torch.long)), 'floating'),
    (lambda: SIGReg(8)(torch.randn(1, 4)), 'N >= 2'),
    (lambda: SIGReg(8)(torch.randn(4)), 'ndim >= 2'),
    (lambda: SIGReg(8)(torch.full((4, 3), float('nan'))), 'non-finite'),
    (lambda: SIGReg(8)(torch.randn(4, 3), directions=torch.randn(5, 2)), 'directions'),
    (lambda: SIGReg(0), 'num_slices'),
    (lambda: SIGReg(8, test='kolmogorov'), 'not one of'),
    (lambda: SIGReg(8, reduction='sum'), 'not one of'),
    (lambda: SIGReg(8, distributed='maybe'), 'not one of'),
    (lambda: SIGReg(8, n_knots=1), 'n_knots'),
    (lambda: SIGReg(8, t_max=-1.0), 't_max'),
    (lambda: epps_pulley_grid(window='cosine'), 'not one of'),
    (lambda: unit_directions(0, 4, 0), 'dim'),
    (lambda: unit_directions(4, 0, 0), 'num_slices'),
    (lambda: unit_directions(4, 4, -1), 'step'),
    (lambda: unit_directions(4, 4, 0, seed=-2), 'seed'),
    (lambda: epps_pulley(torch.randn(8, 3), distributed=True), 'not initialised'),
    (lambda: anderson_darling(torch.randn(1, 3)), 'N >= 2'),
])
def test_bad_input_raises_valueerror_naming_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_even_knot_counts_are_allowed():
    "Folding on [0, t_max] has no parity rule; an even count is a plain trapezoid with dt = t_max/(n-1)."
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    torch.testing.assert_close(epps_pulley(x, n_knots=16), _direct_ep64(x, 16), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ statistical facts
def test_gaussian_null_is_about_1_05_whatever_n():
    g = torch.Generator().manual_seed(9)
    for N in (8, 64, 1024):
        T = epps_pulley(torch.randn(N, 4000, generator=g)).mean().item()      # independent slices
        assert abs(T - NULL_MEAN) < 0.06, (N, T)


@pytest.mark.parametrize('name,sample', [
    ('N(0,4)', lambda N, g: 2 * torch.randn(N, 64, generator=g)),
    ('uniform', lambda N, g: (torch.rand(N, 64, generator=g) - 0.5) * math.sqrt(12)),
    ('shifted', lambda N, g: torch.randn(N, 64, generator=g) + 0.5),
])
def test_non_gaussian_grows_linearly_in_n(name, sample):
    g = torch.Generator().manual_seed(10)
    small, big = (epps_pulley(sample(N, g)).mean().item() for N in (1024, 4096))
    assert 3.6 < big / small < 4.2, (name, small, big)


def test_collapse_gives_0_402_n_and_zero_gradient():
    for N in (16, 1000):
        z = torch.zeros(N, 8, requires_grad=True)
        T = SIGReg(32)(z)
        torch.testing.assert_close(T.item(), COLLAPSE * N, rtol=1e-3, atol=0)
        T.backward()
        assert z.grad.abs().max() == 0
    # collapse onto any other point is not stationary (the mean is pulled to 0), but every sample gets the
    # same gradient, so gradient descent alone can never spread a collapsed batch out again
    z = torch.full((64, 8), 0.7, dtype=torch.float64, requires_grad=True)
    SIGReg(32)(z).backward()
    assert z.grad.abs().max() > 1e-3 and (z.grad - z.grad[:1]).abs().max() < 1e-12


def test_gradients_are_bounded_by_8_per_sample():
    t, w = epps_pulley_grid(dtype=torch.float64)
    bound = 4 * (w * t).sum().item()
    assert bound < 8
    g = torch.Generator().manual_seed(11)
    for z in (3 * torch.rand(256, 16, generator=g) - 1, 0.05 * torch.randn(256, 16, generator=g),
              torch.randn(256, 16, generator=g) ** 3):
        z = z.requires_grad_()
        stats = SIGReg(128, reduction='none')(z)
        for j in range(0, 128, 16):                                          # single slices: the worst case
            gz, = torch.autograd.grad(stats[j], z, retain_graph=True)
            assert gz.norm(dim=-1).max() <= bound


def test_rotation_covariance():
    g = torch.Generator().manual_seed(12)
    z = torch.randn(128, 12, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, 12, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    A = unit_directions(12, 40, 0, dtype=torch.float64)
    torch.testing.assert_close(sigreg(z @ Q, directions=A), sigreg(z, directions=Q @ A), rtol=1e-10, atol=1e-10)


def test_unit_norm_directions_matter():
    g = torch.Generator().manual_seed(13)
    z = torch.randn(512, 64, generator=g)
    raw = torch.randn(64, 256, generator=g)
    unit, unnormalised = sigreg(z, directions=raw / raw.norm(dim=0)).item(), sigreg(z, directions=raw).item()
    assert unit < 1.6 and unnormalised > 100


def test_other_tests_match_their_textbook_formulas():
    scipy_stats = pytest.importorskip('scipy.stats')
    g = torch.Generator().manual_seed(14)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64) * 1.2 + 0.1
    for j in range(3):
        col = x[:, j].numpy()
        cvm = scipy_stats.cramervonmises(col, 'norm').statistic
        assert abs(cramer_von_mises(x)[j].item() - cvm) < 1e-10
        xs = torch.sort(x[:, j]).values; N = 60; i = torch.arange(1, N + 1, dtype=torch.float64)
        F = torch.tensor(scipy_stats.norm.cdf(xs.numpy()))
        ad = -N - ((2 * i - 1) * (torch.log(F) + torch.log(1 - F.flip(0)))).sum() / N
        assert abs(anderson_darling(x)[j].item() - ad.item()) < 1e-9
    # null levels are O(1) and every test is differentiable
    z = torch.randn(400, 50, generator=g, dtype=torch.float64, requires_grad=True)
    for name, fn in UNIVARIATE_TESTS.items():
        v = fn(z)
        assert v.shape == (50,) and v.mean().item() < 6, name
        gz, = torch.autograd.grad(v.sum(), z)
        assert torch.isfinite(gz).all(), name
    for name in UNIVARIATE_TESTS:
        assert math.isfinite(SIGReg(16, test=name)(torch.randn(40, 5)).item())


def test_collapse_is_caught_by_every_test_but_vcreg_sees_only_scale():
    g = torch.Generator().manual_seed(15)
    tiny = 0.01 * torch.randn(256, 20, generator=g)
    for name, fn in UNIVARIATE_TESTS.items():
        assert fn(tiny).mean() > 20, name


# ------------------------------------------------------------------ DDP (2 gloo processes)
N_RANK = (40, 56)        # unequal local batches on purpose
D, M = 8, 24


def _global_batch():
    g = torch.Generator().manual_seed(16)
    return torch.randn(sum(N_RANK), D, generator=g) ** 3 * 0.8 + 0.1      # clearly non-Gaussian


def _ddp_worker(rank: int, world: int, out: str):
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{out}/rendezvous', rank=rank, world_size=world)
    z_all = _global_batch()
    lo = sum(N_RANK[:rank]); rows = slice(lo, lo + N_RANK[rank])
    res = {}
    # 1. the loss on local rows: same value on every rank, gradient = W × global gradient
    z = z_all[rows].clone().requires_grad_()
    loss = SIGReg(M)
    loss.step.fill_(3 if rank == 0 else 5)            # ranks disagree: the MAX all-reduce syncs them to 5
    value = loss(z)
    value.backward()
    res['value'], res['grad'] = value.detach().reshape(1), z.grad
    res['step'] = loss.step.clone().reshape(1)
    local = SIGReg(M, distributed=False).eval(); local.step.fill_(5)
    res['local_value'] = local(z_all[rows]).detach().reshape(1)        # control: the rank's own batch only
    # 2. epps_pulley on given projections (here the raw coordinates)
    proj = z_all[rows].detach().clone().requires_grad_()
    stats = epps_pulley(proj)
    stats.sum().backward()
    res['ep'], res['ep_grad'] = stats.detach(), proj.grad
    # 3. a DDP-wrapped linear model: averaged parameter grads equal the single-process grads
    torch.manual_seed(0)
    model = DDP(nn.Linear(D, D))
    SIGReg(M)(model(z_all[rows])).backward()
    res['w_grad'], res['b_grad'] = model.module.weight.grad, model.module.bias.grad
    save_file({k: v.contiguous() for k, v in res.items()}, f'{out}/rank{rank}.safetensors')
    dist.barrier()
    dist.destroy_process_group()


def _ddp_child(rank, world, out):
    try:
        _ddp_worker(rank, world, out)
    except BaseException:
        import traceback
        Path(f'{out}/rank{rank}.err').write_text(traceback.format_exc())
        raise


def _run_ranks(method, out, world=2, timeout=120):
    import multiprocessing as mp
    for f in out.glob('*'): f.unlink()
    ctx = mp.get_context(method)
    procs = [ctx.Process(target=_ddp_child, args=(r, world, str(out))) for r in range(world)]
    for p in procs: p.start()
    for p in procs: p.join(timeout)
    for p in procs:
        if p.is_alive(): p.kill(); p.join()
    errors = [e.read_text() for e in sorted(out.glob('*.err'))]
    return [p.exitcode for p in procs], errors


@pytest.fixture(scope='module')
def ddp_results(tmp_path_factory):
    "Two gloo processes, forked from this one (no re-import of torch: ~1 s); spawned if forking fails."
    pytest.importorskip('safetensors')
    import multiprocessing as mp
    out = tmp_path_factory.mktemp('ddp')
    methods = [m for m in ('fork', 'spawn') if m in mp.get_all_start_methods()]
    if os.environ.get('PHYSNB_DDP_START') in methods: methods = [os.environ['PHYSNB_DDP_START']]   # to test the fallback
    for method in methods:
        codes, errors = _run_ranks(method, out)
        if not errors and not any(codes): break
    else:
        raise AssertionError(f'DDP workers failed ({method}, exit codes {codes}):\n' + '\n'.join(errors))
    from safetensors.torch import load_file
    return [load_file(f'{out}/rank{r}.safetensors') for r in range(2)]


def test_ddp_value_equals_one_process_on_the_global_batch(ddp_results):
    z_all = _global_batch()
    ref = sigreg(z_all, M, step=5)                      # both ranks synced to step 5
    for r in range(2):
        assert int(ddp_results[r]['step']) == 6          # advanced once after the sync
        torch.testing.assert_close(ddp_results[r]['value'][0], ref, rtol=1e-6, atol=1e-6)
        assert abs(ddp_results[r]['local_value'][0] - ref) > 1e-3 * ref     # without the all-reduce it differs
    torch.testing.assert_close(ddp_results[0]['ep'], ddp_results[1]['ep'], rtol=0, atol=0)
    torch.testing.assert_close(ddp_results[0]['ep'], epps_pulley(z_all), rtol=1e-6, atol=1e-5)


def test_ddp_local_gradient_is_world_size_times_the_global_gradient(ddp_results):
    z_all = _global_batch().requires_grad_()
    sigreg(z_all, M, step=5).backward()
    ref = z_all.grad
    p = z_all.detach().clone().requires_grad_()
    epps_pulley(p).sum().backward()
    lo = 0
    for r, n in enumerate(N_RANK):
        torch.testing.assert_close(ddp_results[r]['grad'], 2 * ref[lo:lo + n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ddp_results[r]['ep_grad'], 2 * p.grad[lo:lo + n], rtol=1e-5, atol=1e-6)
        lo += n


def test_ddp_wrapped_model_gets_the_single_process_gradient(ddp_results):
    torch.manual_seed(0)
    model = nn.Linear(D, D)
    SIGReg(M)(model(_global_batch())).backward()
    for r in range(2):
        torch.testing.assert_close(ddp_results[r]['w_grad'], model.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ddp_results[r]['b_grad'], model.bias.grad, rtol=1e-5, atol=1e-6)

