"""SIGReg forward+backward: physnb.models.sigreg vs jepa-science 0.1.0 `sigreg_loss` (the peer), measured in the same run.

Time: the same embeddings z (N, D=128) and the same 1024 directions (step 0 = Generator().manual_seed(0)) go through
both; one call = draw directions, project, statistic, backward to z. The two are interleaved (ABAB...) so load on the
shared box hits both alike; we report medians and the ratio peer/ours (> 1: ours is faster).

Memory: each implementation runs once at N=4096 in a FRESH subprocess (torch's CPU allocations are invisible to
tracemalloc). The child imports everything, builds z and warms up on a tiny batch; then it resets the kernel's
resident-set high-water mark (`echo 5 > /proc/self/clear_refs`), runs one forward+backward at full size and reports
`VmHWM − VmRSS_before`: the extra resident memory that call needed at its peak. (`ru_maxrss` is the fallback off
Linux; it is unreliable here because Linux carries a parent's peak RSS across fork+exec into the child.)

Usage: OMP_NUM_THREADS=1 python bench/bench_sigreg.py [--quick]    → prints a table, writes bench/out/sigreg.json
"""
import json, os, platform, resource, subprocess, sys, time
from pathlib import Path

os.environ.setdefault('OMP_NUM_THREADS', '1')
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from physnb.core import atomic_write          # noqa: E402
from physnb.models.sigreg import sigreg, epps_pulley, unit_directions   # noqa: E402

D, M = 128, 1024


def _ours(z):
    return sigreg(z, M, step=0)


def _peer(z):
    import jepa_science
    if z.device.type == 'cpu':             # the public API; its step-0 CPU directions are ours (tested)
        return jepa_science.sigreg_loss(z, M, generator=torch.Generator().manual_seed(0))
    # on a GPU its generator would draw other directions than our CPU draw: same maths, our directions
    from jepa_science.sigreg import _slice_statistics, epps_pulley_quadrature
    t, w = epps_pulley_quadrature(17, 3.0, device=z.device)
    return _slice_statistics(z @ unit_directions(D, M, 0, device=z.device), t, w).mean()


IMPLS = {'physnb': _ours, 'jepa_science': _peer}


def _embeddings(N, device='cpu'):
    g = torch.Generator().manual_seed(N)
    return (torch.randn(N, D, generator=g) ** 3 * 0.5 + 0.1).to(device)    # non-Gaussian: a loss far from the null


def _sync(device):
    if device.startswith('cuda'): torch.cuda.synchronize()


def fwd_bwd(fn, z, device='cpu'):
    z = z.detach().requires_grad_()
    _sync(device); t0 = time.perf_counter()
    loss = fn(z); loss.backward()
    _sync(device)
    return time.perf_counter() - t0, loss.detach(), z.grad


def time_pair(N, repeats, device='cpu'):
    z = _embeddings(N, device)
    times = {k: [] for k in IMPLS}
    for name, fn in IMPLS.items(): fwd_bwd(fn, z[:64], device)           # warm-up
    for _ in range(repeats):
        for name, fn in IMPLS.items():
            dt, _, _ = fwd_bwd(fn, z, device); times[name].append(dt)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    _, v_ours, g_ours = fwd_bwd(_ours, z, device)
    _, v_peer, g_peer = fwd_bwd(_peer, z, device)
    return dict(N=N, D=D, M=M, device=device, repeats=repeats,
                median_s=med, all_s=times, time_ratio_peer_over_ours=med['jepa_science'] / med['physnb'],
                value_ours=v_ours.item(), value_peer=v_peer.item(),
                value_rel_diff=abs(v_ours.item() - v_peer.item()) / abs(v_peer.item()),
                grad_max_abs_diff=(g_ours - g_peer).abs().max().item(), grad_max_abs=g_peer.abs().max().item())


def agreement_on_projections():
    "epps_pulley vs the peer's per-slice statistic on identical projections (several distributions)."
    from jepa_science.sigreg import _slice_statistics, epps_pulley_quadrature
    t, w = epps_pulley_quadrature(17, 3.0)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, proj in {'N(0,1)': torch.randn(1024, 256, generator=g), 'N(0,4)': 2 * torch.randn(1024, 256, generator=g),
                       'uniform': (torch.rand(1024, 256, generator=g) - 0.5) * 12 ** 0.5,
                       'near-collapse': 0.01 * torch.randn(1024, 256, generator=g)}.items():
        a, b = epps_pulley(proj), _slice_statistics(proj, t, w)
        truth = _slice_statistics(proj.double(), t.double(), w.double())     # same projections, float64 arithmetic
        out[name] = dict(max_abs_diff=(a - b).abs().max().item(), max_rel_diff=((a - b).abs() / b.abs()).max().item(),
                         mean_value=b.mean().item(), ours_max_rel_err_vs_fp64=((a - truth).abs() / truth).max().item(),
                         peer_max_rel_err_vs_fp64=((b - truth).abs() / truth).max().item())
    return out


def _status_kib(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'): return int(line.split()[1])
    raise KeyError(field)


def memory_child(impl, N):
    "Runs in a fresh process: increase of the peak resident set during one forward+backward."
    torch.set_num_threads(1)
    z = _embeddings(N)
    fwd_bwd(IMPLS[impl], z[:64])                                        # warm-up: kernels, allocator, imports
    try:                                                                # Linux: reset the high-water mark to the current RSS
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        before, method = _status_kib('VmRSS'), 'VmHWM after the call minus VmRSS before it (clear_refs=5 reset the high-water mark)'
    except OSError:                                                     # elsewhere: peak RSS so far (exec keeps a parent's peak on Linux!)
        before, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'ru_maxrss after minus before'
    _, v, _ = fwd_bwd(IMPLS[impl], z)
    after = _status_kib('VmHWM') if method.startswith('VmHWM') else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(impl=impl, N=N, peak_rss_increase_mib=(after - before) / 1024, baseline_mib=before / 1024,
                          value=v.item(), method=method)))


def memory_pair(N):
    res = {}
    for impl in IMPLS:
        env = {**os.environ, 'OMP_NUM_THREADS': '1'}
        p = subprocess.run([sys.executable, __file__, '--memory-child', impl, str(N)], capture_output=True, text=True,
                           env=env, timeout=300)
        if p.returncode: raise RuntimeError(p.stderr)
        res[impl] = json.loads(p.stdout.strip().splitlines()[-1])
    res['memory_ratio_ours_over_peer'] = res['physnb']['peak_rss_increase_mib'] / res['jepa_science']['peak_rss_increase_mib']
    return res


def cuda_section():
    if not torch.cuda.is_available(): return None
    out = []
    for N in (1024, 4096, 16384):
        r = time_pair(N, 10, 'cuda')
        mem = {}
        for name, fn in IMPLS.items():
            z = _embeddings(N, 'cuda'); torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd(fn, z, 'cuda')
            mem[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        r['peak_mib'] = mem; r['memory_ratio_ours_over_peer'] = mem['physnb'] / mem['jepa_science']
        out.append(r)
    return out


def main(quick=False):
    torch.set_num_threads(1)
    t_start = time.time()
    load = os.getloadavg()
    sizes = [(256, 5), (1024, 5), (4096, 3)] if not quick else [(256, 3), (1024, 3)]
    timing = []
    mem = memory_pair(4096 if not quick else 1024)                     # first, while this process is still small
    print(f'SIGReg fwd+bwd, D={D}, M={M} slices, 17 knots, CPU, {torch.get_num_threads()} thread; load {load[0]:.2f}')
    print(f'{"N":>6} {"physnb ms":>10} {"jepa-science ms":>16} {"ratio":>6} {"value rel diff":>15} {"grad max diff":>14}')
    for N, rep in sizes:
        r = time_pair(N, rep); timing.append(r)
        print(f'{N:6d} {1e3 * r["median_s"]["physnb"]:10.1f} {1e3 * r["median_s"]["jepa_science"]:16.1f} '
              f'{r["time_ratio_peer_over_ours"]:6.2f} {r["value_rel_diff"]:15.2e} {r["grad_max_abs_diff"]:14.2e}')
    agree = agreement_on_projections()
    print('epps_pulley vs peer on identical projections (1024 x 256):')
    for k, v in agree.items():
        print(f'  {k:14s} mean T {v["mean_value"]:9.3f}  max abs diff {v["max_abs_diff"]:.2e}  max rel diff {v["max_rel_diff"]:.2e}'
              f'   rel error vs float64: ours {v["ours_max_rel_err_vs_fp64"]:.1e}, peer {v["peer_max_rel_err_vs_fp64"]:.1e}')
    print(f'peak memory of one fwd+bwd at N={mem["physnb"]["N"]} (peak-RSS increase in a fresh process per implementation): '
          f'physnb {mem["physnb"]["peak_rss_increase_mib"]:.1f} MiB, jepa-science {mem["jepa_science"]["peak_rss_increase_mib"]:.1f} MiB, '
          f'ratio {mem["memory_ratio_ours_over_peer"]:.3f}')
    cuda = cuda_section()
    load_end = os.getloadavg()
    result = dict(bench='sigreg', peer='jepa-science 0.1.0 sigreg_loss', torch=torch.__version__, machine=platform.machine(),
                  threads=torch.get_num_threads(), load_start=load, load_end=load_end, quick=quick,
                  timing=timing, agreement_on_projections=agree, memory=mem, cuda=cuda,
                  memory_method='fresh subprocess per implementation, after imports, input creation and a tiny warm-up: '
                                  + mem['physnb']['method'],
                  wall_s=time.time() - t_start)
    out = ROOT / 'bench' / 'out' / 'sigreg.json'
    with atomic_write(out) as f: json.dump(result, f, indent=1)
    print(f'load at end {load_end[0]:.2f}; total {result["wall_s"]:.0f} s; wrote {out.relative_to(ROOT)}')
    return result


if __name__ == '__main__':
    if len(sys.argv) == 4 and sys.argv[1] == '--memory-child':
        memory_child(sys.argv[2], int(sys.argv[3]))
    else:
        main(quick='--quick' in sys.argv)
