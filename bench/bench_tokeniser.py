"""bench/tokeniser: the adjustable (stride-modulated) tokeniser against a fixed-stride peer, in one run, per level.

The issue's goal: the adjustable tokeniser costs <= 1.2x a fixed-stride tokeniser of the same width.
The peer, `FixedStrideTokeniser`, is the same architecture with the strides baked in at construction: plain
`nn.Conv3d` / `nn.ConvTranspose3d` modules with a constant stride and the spatial padding done by the module
itself (`padding_mode='circular'`). The decoder's averaging over overlapping kernel copies is a constant for a fixed
stride, so the peer bakes it into its weights (the adjustable model divides its kernel by it on every call). It gets a copy of the adjustable model's weights, and its output is checked
against the adjustable model's before anything is timed. One peer is built per level, because a fixed-stride
tokeniser serves one level only.

Measured per level: encode+decode throughput (samples/s) for the forward pass (no grad) and for forward+backward,
as the median of interleaved repeats so that both models see the same machine load. The ratio printed is the median
over repeats of (adjustable time / fixed time) of back-to-back pairs; ratios of medians and of minima are stored too.

Usage: OMP_NUM_THREADS=1 python bench/bench_tokeniser.py [--quick] [--device auto|cpu|cuda] [--out PATH]
       -> bench/out/tokeniser.json (written atomically)
"""
import argparse, json, os, platform, statistics, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from physnb.core import atomic_write, get_device
from physnb.models.tokeniser import (Compression, FrameNorm, SPATIAL_STAGE_STRIDES, TEMPORAL_STAGE_STRIDES,
                                     Tokeniser, TokeniserConfig, crop_stage, overlaps)

OUT = Path(__file__).resolve().parent / 'out' / 'tokeniser.json'


class FixedDown(nn.Module):
    "Encoder stage with its stride fixed at construction: causal time pad, nn.Conv3d with built-in circular padding, residual unit."
    def __init__(self, stage, stride):
        super().__init__()
        (kt, ks), (st, ss) = stage.kernel, stride
        p = ks - ss
        assert p % 2 == 0, 'the peer uses symmetric built-in padding'
        self.time_pad = kt - st
        self.conv = nn.Conv3d(stage.conv.in_channels, stage.conv.out_channels, (kt, ks, ks), stride=(st, ss, ss),
                              padding=(0, p // 2, p // 2), padding_mode='circular')
        self.norm = FrameNorm(stage.conv.out_channels, stage.norm.groups, stage.norm.kind)
        self.mix = nn.Conv3d(stage.conv.out_channels, stage.conv.out_channels, 1)
        for name in ('conv', 'norm', 'mix'): getattr(self, name).load_state_dict(getattr(stage, name).state_dict())

    def forward(self, x):
        h = self.conv(F.pad(x, (0, 0, 0, 0, self.time_pad, 0)))
        return h + self.mix(F.silu(self.norm(h)))


class FixedUp(nn.Module):
    "Decoder stage with its stride fixed at construction: nn.ConvTranspose3d (weights pre-divided by the overlaps), causal cut, circular fold."
    def __init__(self, stage, stride):
        super().__init__()
        (kt, ks), (st, ss) = stage.kernel, stride
        self.kernel, self.stride = stage.kernel, stride
        self.conv = nn.ConvTranspose3d(stage.conv.in_channels, stage.conv.out_channels, (kt, ks, ks), stride=(st, ss, ss), bias=False)
        self.bias = nn.Parameter(stage.conv.bias.detach().clone())
        self.norm = FrameNorm(stage.conv.out_channels, stage.norm.groups, stage.norm.kind)
        self.mix = nn.Conv3d(stage.conv.out_channels, stage.conv.out_channels, 1)
        with torch.no_grad(): self.conv.weight.copy_(stage.conv.weight * (stage.gain / overlaps(stage.kernel, stride)))   # gain x average baked in
        self.norm.load_state_dict(stage.norm.state_dict()); self.mix.load_state_dict(stage.mix.state_dict())

    def forward(self, x):
        st, ss = self.stride
        size = (x.shape[-3] * st, x.shape[-2] * ss, x.shape[-1] * ss)
        h = crop_stage(self.conv(x), self.kernel, self.stride, size, 'circular') + self.bias[:, None, None, None]
        return h + self.mix(F.silu(self.norm(h)))


class FixedStrideTokeniser(nn.Module):
    "The same architecture and weights as a `Tokeniser`, for one compression level fixed at construction."
    def __init__(self, tok: Tokeniser, compression, fields):
        super().__init__()
        assert tok.config.padding_mode == 'circular'
        s, t = Compression(*compression)
        (s1, s2), (t1, t2) = SPATIAL_STAGE_STRIDES[s], TEMPORAL_STAGE_STRIDES[t]
        idx = tok.field_index(fields)
        self.field_in = nn.Parameter(tok.field_in.detach()[idx].clone())
        self.field_out = nn.Parameter(tok.field_out.detach()[idx].clone())
        self.field_out_bias = nn.Parameter(tok.field_out_bias.detach()[idx].clone())
        self.down1, self.down2 = FixedDown(tok.encoder[0], (t1, s1)), FixedDown(tok.encoder[1], (t2, s2))
        self.to_latent, self.from_latent = tok.to_latent, tok.from_latent
        self.up2, self.up1 = FixedUp(tok.decoder[0], (t2, s2)), FixedUp(tok.decoder[1], (t1, s1))

    def forward(self, x):                                               # (B, T, C, H, W)
        h = torch.einsum('btchw,ce->bethw', x, self.field_in)
        tokens = self.to_latent(self.down2(self.down1(h)))              # (B, latent, T', H', W')
        y = self.up1(self.up2(self.from_latent(tokens)))                # (B, embed, T, H, W)
        return torch.einsum('bethw,ce->btchw', y, self.field_out) + self.field_out_bias[:, None, None]


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def time_pair(runs: dict, reps: int, device) -> dict:
    "Median/min seconds per call of each function, repeats interleaved across the functions."
    for f in runs.values(): f(); f()                                    # warm-up
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, f in runs.items():
            sync(device); t = time.perf_counter(); f(); sync(device); times[name].append(time.perf_counter() - t)
    return {name: dict(median_s=statistics.median(v), min_s=min(v), all_s=v) for name, v in times.items()}


def paired_ratio(t: dict) -> float:
    "Median over repeats of adjustable/fixed time, each pair timed back to back: robust to load that drifts between repeats."
    return statistics.median(a / f for a, f in zip(t['adjustable']['all_s'], t['fixed']['all_s']))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='smaller sizes and fewer repeats (smoke run)')
    ap.add_argument('--device', default='auto', help="'auto' (cuda when available), 'cpu' or 'cuda'")
    ap.add_argument('--reps', type=int, default=None, help='timed repeats per model and level')
    ap.add_argument('--out', type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = get_device(args.device)
    cuda = device.type == 'cuda'
    B, T, C, N, width, latent = (2, 4, 2, 32, 32, 8) if args.quick else ((16, 8, 2, 128, 128, 32) if cuda else (4, 8, 2, 64, 64, 16))
    reps = args.reps or (3 if args.quick else (20 if cuda else 5))
    fields = ['A', 'B']
    torch.manual_seed(0)
    tok = Tokeniser(TokeniserConfig(field_names=fields + ['vorticity', 'velocity_x', 'velocity_y'], width=width, latent=latent)).to(device)
    x = torch.randn(B, T, C, N, N, device=device)
    load_before = os.getloadavg()
    print(f'device={device}, threads={torch.get_num_threads()}, B={B}, T={T}, C={C}, {N}x{N}, width={width}, latent={latent}, '
          f'reps={reps}, load={load_before[0]:.2f}')
    print(f"{'level':>6} {'tokens':>7} | {'fwd samples/s':>22} {'ratio':>6} | {'fwd+bwd samples/s':>22} {'ratio':>6}")
    print(f"{'':>6} {'':>7} | {'adjustable':>11}{'fixed':>11} {'':>6} | {'adjustable':>11}{'fixed':>11}")
    rows = []
    t_start = time.perf_counter()
    for comp in tok.allowed_compressions((T, N, N)):
        fixed = FixedStrideTokeniser(tok, comp, fields).to(device)
        with torch.no_grad():
            err = (fixed(x) - tok(x, fields, comp)).abs().max().item()
        assert err < 1e-4, f'fixed-stride peer disagrees with the adjustable tokeniser at {comp}: {err:.2e}'

        def fwd(model):
            def f():
                with torch.no_grad(): model()
            return f
        def fwd_bwd(model, params):
            def f():
                for p in params: p.grad = None
                model().square().mean().backward()
            return f
        adjustable = lambda: tok(x, fields, comp)
        peer = lambda: fixed(x)
        t_fwd = time_pair({'adjustable': fwd(adjustable), 'fixed': fwd(peer)}, reps, device)
        t_bwd = time_pair({'adjustable': fwd_bwd(adjustable, list(tok.parameters())),
                           'fixed': fwd_bwd(peer, list(fixed.parameters()))}, reps, device)
        row = dict(compression=str(comp), tokens_per_sample=tok.token_count((T, N, N), comp), max_abs_diff=err)
        for name, t in (('forward', t_fwd), ('forward_backward', t_bwd)):
            row[name] = {m: dict(samples_per_s=B / v['median_s'], median_s=v['median_s'], min_s=v['min_s'],
                                 all_s=[round(s, 5) for s in v['all_s']]) for m, v in t.items()}
            row[name]['ratio'] = paired_ratio(t)                                          # time ratio adjustable / fixed
            row[name]['ratio_of_medians'] = t['adjustable']['median_s'] / t['fixed']['median_s']
            row[name]['ratio_of_mins'] = t['adjustable']['min_s'] / t['fixed']['min_s']
        rows.append(row)
        f, b = row['forward'], row['forward_backward']
        print(f"{str(comp):>6} {row['tokens_per_sample']:>7} | {f['adjustable']['samples_per_s']:>11.1f}{f['fixed']['samples_per_s']:>11.1f} "
              f"{f['ratio']:>5.2f}x | {b['adjustable']['samples_per_s']:>11.1f}{b['fixed']['samples_per_s']:>11.1f} {b['ratio']:>5.2f}x",
              flush=True)
    worst = max(max(r['forward']['ratio'], r['forward_backward']['ratio']) for r in rows)
    result = dict(
        goal='adjustable tokeniser costs <= 1.2x a fixed-stride tokeniser of the same width (time ratio adjustable/fixed, median of paired repeats)',
        worst_ratio=worst, goal_met=worst <= 1.2,
        geomean_ratio_forward=statistics.geometric_mean(r['forward']['ratio'] for r in rows),
        geomean_ratio_forward_backward=statistics.geometric_mean(r['forward_backward']['ratio'] for r in rows),
        levels=rows,
        setup=dict(device=str(device), threads=torch.get_num_threads(), batch=B, frames=T, channels=C, grid=[N, N],
                   width=width, latent=latent, reps=reps, quick=args.quick, config=dict(tok.config.__dict__)),
        machine=dict(torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
                     cpu_count=os.cpu_count(), loadavg_before=load_before, loadavg_after=os.getloadavg(),
                     OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS'),
                     gpu=torch.cuda.get_device_name(device) if cuda else None),
        wall_s=time.perf_counter() - t_start,
    )
    print(f"worst ratio {worst:.3f}x (goal <= 1.2x: {'met' if result['goal_met'] else 'NOT met'}); "
          f"geomean forward {result['geomean_ratio_forward']:.3f}x, forward+backward {result['geomean_ratio_forward_backward']:.3f}x; "
          f"{result['wall_s']:.0f} s, load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as f: json.dump(result, f, indent=1, default=str)
    print('wrote', args.out)
    return result


if __name__ == '__main__':
    main()
