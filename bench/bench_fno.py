"""bench/fno: physnb's FNO against neuraloperator 2.0's, in one run, on one CPU thread.

1. Same modes: neuraloperator's SpectralConv weights copied into ours give the same output.
2. Train-step time (forward + backward + AdamW step) at equal width, kept modes and parameter count.
3. Test error at equal epochs on the same small task (anisotropic periodic Poisson, SYS-1 of Subramanian et al.).

Usage: OMP_NUM_THREADS=1 python bench/bench_fno.py [--quick] [--skip-train] [--out PATH]   -> bench/out/fno.json
Allocator settings (e.g. THP_MEM_ALLOC_ENABLE=1, MALLOC_* tunables) apply to both models alike and are recorded.
neuraloperator is needed here only (pip extra `oracles`); physnb never imports it.
"""
import argparse, json, math, os, platform, statistics, sys, time, warnings
from pathlib import Path

import torch
torch.set_num_threads(1)
warnings.filterwarnings('ignore')

import neuralop
from neuralop.models import FNO as NeuralopFNO

from physnb.core import atomic_write
from physnb.models.fno import (FNO, FNOConfig, InstanceScaler, SpectralConv2d, count_parameters,
                               neuralop_n_modes)

OUT = Path(__file__).resolve().parent / 'out' / 'fno.json'


def build_pair(in_channels, width, modes, channel_mlp=False, seed=0):
    "Ours and neuraloperator's FNO with the same architecture (lifting/projection ratio 2, linear skip, no grid channels)."
    torch.manual_seed(seed)
    ours = FNO(FNOConfig(in_channels=in_channels, out_channels=1, width=width, modes=modes, n_layers=4,
                         lifting_ratio=2, projection_ratio=2, channel_mlp=channel_mlp))
    torch.manual_seed(seed)
    theirs = NeuralopFNO(n_modes=neuralop_n_modes(modes), in_channels=in_channels, out_channels=1, hidden_channels=width,
                         n_layers=4, lifting_channel_ratio=2, projection_channel_ratio=2, positional_embedding=None,
                         use_channel_mlp=channel_mlp, fno_skip='linear')
    return ours, theirs


def check_same_modes(width=6, m=5, n=24):
    "Copy neuraloperator's spectral weights (centred rows) into ours (FFT-ordered rows): outputs must agree."
    ours = SpectralConv2d(width, width, m)
    _, theirs = build_pair(2, width, m)
    conv = theirs.fno_blocks.convs[0]
    w = conv.weight.to_tensor() if hasattr(conv.weight, 'to_tensor') else conv.weight   # (in, out, 2m, m) complex, rows -m..m-1
    w = w.detach().roll(m, dims=2)                                                       # rows 0..m-1, -m..-1
    with torch.no_grad():
        ours.weight.copy_(torch.view_as_real(w.permute(3, 2, 0, 1)).permute(0, 1, 2, 4, 3))   # (my, 2mx, in, 2, out)
        ours.bias.copy_(conv.bias.detach().flatten())
    x = torch.randn(3, width, n, n)
    return (ours(x) - conv(x)).abs().max().item()


def time_steps(models, batch, n, in_channels, reps):
    "Median and min train-step time (s) per model, rounds interleaved so both see the same machine load."
    steps = {}
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.randn(batch, in_channels, n, n), torch.randn(batch, 1, n, n)
        def step(model=model, opt=opt, x=x, y=y):
            opt.zero_grad(set_to_none=True)
            loss = (model(x) - y).pow(2).mean(); loss.backward(); opt.step()
        step(); step()                                                  # warm-up (allocations, bases cache)
        steps[name] = step
    times = {name: [] for name in models}
    for _ in range(reps):
        for name, step in steps.items():
            t = time.perf_counter(); step(); times[name].append(time.perf_counter() - t)
    return {name: {'median_s': statistics.median(t), 'min_s': min(t), 'all_s': [round(v, 4) for v in t]} for name, t in times.items()}


# ---- the task: -div(K grad u) = f on the periodic unit square, K = 0.01 R diag(1, e) R^T, e ~ U[1, 5]
def poisson_dataset(n_samples, n, seed):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(n_samples, 6, 2, generator=gen, dtype=torch.float64)
    amps = torch.rand(n_samples, 6, 1, 1, generator=gen, dtype=torch.float64) * 2 - 1
    xs = torch.arange(n, dtype=torch.float64) / n
    dx = (xs[None, None, :] - centres[..., 0:1] + 0.5) % 1 - 0.5
    dy = (xs[None, None, :] - centres[..., 1:2] + 0.5) % 1 - 0.5
    f = (amps * torch.exp(-(dx[..., :, None] ** 2 + dy[..., None, :] ** 2) / (2 * 0.08 ** 2))).sum(1)
    f = f - f.mean((-2, -1), keepdim=True)
    e = 1 + 4 * torch.rand(n_samples, generator=gen, dtype=torch.float64)
    th = 2 * math.pi * torch.rand(n_samples, generator=gen, dtype=torch.float64)
    c, s = torch.cos(th), torch.sin(th)
    K = 0.01 * torch.stack([c * c + e * s * s, s * s + e * c * c, (1 - e) * c * s], 1)
    k = 2 * math.pi * torch.fft.fftfreq(n, 1 / n, dtype=torch.float64)
    symbol = K[:, 0, None, None] * k[:, None] ** 2 + K[:, 1, None, None] * k[None, :] ** 2 + 2 * K[:, 2, None, None] * k[:, None] * k[None, :]
    u_hat = torch.fft.fft2(f) / torch.where(symbol == 0, 1.0, symbol); u_hat[..., 0, 0] = 0
    u = torch.fft.ifft2(u_hat).real
    x = torch.cat([f[:, None], K[:, :, None, None].expand(-1, -1, n, n)], 1)
    return x.float(), u[:, None].float()


def rel_l2(pred, target):   # per-sample relative L2, averaged
    return ((pred - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1)).mean()


def train_both(width, modes, n, n_train, n_test, epochs, batch, lr, seed=0):
    train_x, train_u = poisson_dataset(n_train, n, seed)
    test_x, test_u = poisson_dataset(n_test, n, seed + 10_000)
    scaler = InstanceScaler(4).fit(train_x)                      # the same scaled inputs for both models
    train_x, test_x = scaler(train_x), scaler(test_x)
    u_scale = train_u.std()
    results = {}
    ours, theirs = build_pair(4, width, modes, seed=seed)
    for name, model in (('physnb', ours), ('neuralop', theirs)):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = n_train // batch
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            order = torch.randperm(n_train, generator=gen)
            for b in range(steps_per_epoch):
                idx = order[b * batch:(b + 1) * batch]
                loss = rel_l2(model(train_x[idx]) * u_scale, train_u[idx])
                opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
        train_s = time.perf_counter() - t0
        with torch.no_grad():
            err = rel_l2(model(test_x) * u_scale, test_u).item()
            train_err = rel_l2(model(train_x) * u_scale, train_u).item()
        results[name] = {'test_rel_l2': err, 'train_rel_l2': train_err, 'train_seconds': train_s, 'params': count_parameters(model)}
        print(f"  {name:9s} test rel-L2 {err:.4f}  train rel-L2 {train_err:.4f}  ({train_s:.0f} s, {count_parameters(model):,} params)", flush=True)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--quick', action='store_true', help='smaller run (smoke test)')
    ap.add_argument('--reps', type=int, default=9, help='timed train steps per model and config')
    ap.add_argument('--skip-train', action='store_true', help='timings only, no error comparison')
    ap.add_argument('--out', type=Path, default=OUT, help='where the JSON report goes')
    args = ap.parse_args()
    report = {'torch': torch.__version__, 'neuraloperator': neuralop.__version__, 'threads': torch.get_num_threads(),
              'machine': platform.processor() or platform.machine(), 'python': sys.version.split()[0],
              'allocator_env': {k: v for k, v in os.environ.items() if k.startswith(('MALLOC_', 'THP_', 'LD_PRELOAD'))},
              'load_average_at_start': os.getloadavg()}

    report['same_modes_max_abs_diff'] = diff = check_same_modes()
    print(f"neuraloperator n_modes={neuralop_n_modes(5)} == our modes=5: max |diff| = {diff:.1e}")
    assert diff < 1e-5, diff

    configs = [dict(batch=32, width=32, n=64, modes=12), dict(batch=8, width=64, n=128, modes=16),
               dict(batch=32, width=32, n=64, modes=12, channel_mlp=True)]
    if args.quick: configs = [dict(batch=8, width=16, n=32, modes=8)]
    report['speed'] = []
    for cfg in configs:
        ours, theirs = build_pair(4, cfg['width'], cfg['modes'], cfg.get('channel_mlp', False))
        p_ours, p_theirs = count_parameters(ours), count_parameters(theirs)
        t = time_steps({'physnb': ours, 'neuralop': theirs}, cfg['batch'], cfg['n'], 4, args.reps if not args.quick else 3)
        ratio = t['neuralop']['median_s'] / t['physnb']['median_s']
        row = {**cfg, 'params_physnb': p_ours, 'params_neuralop': p_theirs,
               'params_neuralop_numel': sum(p.numel() for p in theirs.parameters()), **{f'{k}': v for k, v in t.items()},
               'speedup_median': ratio, 'speedup_min': t['neuralop']['min_s'] / t['physnb']['min_s']}
        report['speed'].append(row)
        print(f"B{cfg['batch']} C{cfg['width']} N{cfg['n']} m{cfg['modes']}{' +channel_mlp' if cfg.get('channel_mlp') else ''}: "
              f"params {p_ours:,} vs {p_theirs:,} | step physnb {1e3 * t['physnb']['median_s']:.0f} ms, "
              f"neuralop {1e3 * t['neuralop']['median_s']:.0f} ms (median) -> {ratio:.2f}x "
              f"(min-based {row['speedup_min']:.2f}x)", flush=True)
        assert abs(p_ours - p_theirs) <= 0.1 * p_theirs

    task = dict(width=32, modes=12, n=32, n_train=256, n_test=64, epochs=30, batch=32, lr=3e-3)
    if args.quick: task.update(width=16, modes=6, n_train=64, n_test=16, epochs=3, batch=16)
    if not args.skip_train:
        print(f"training both on anisotropic Poisson {task}", flush=True)
        report['task'] = {**task, 'results': train_both(**task)}
    report['load_average_at_end'] = os.getloadavg()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as fh: json.dump(report, fh, indent=1)
    print('wrote', args.out)


if __name__ == '__main__':
    main()
