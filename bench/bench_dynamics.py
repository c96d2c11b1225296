"""Benchmark the kit's dynamics model (tokeniser + space-time processor) against the_well's AViT, on the same Euler windows.

Run: `OMP_NUM_THREADS=1 python bench/bench_dynamics.py [--quick] [--seeds 2] [--steps 300]`. Writes bench/out/dynamics.json.

Peer: the_well 1.2.0's own baseline `the_well.benchmark.models.AViT` (axial attention, patch 16, the
context frames stacked in channels), sized so its parameter count is within 10% of the kit's model.
Both see the same normalised Euler windows (physnb.sim.euler, 64², 8 frames) in the same order, with
AdamW at the same learning rate for the same number of steps:

* physnb: `DynamicsModel` at compression 16x1 by default (a 4x4 token grid per frame, the grid AViT's
  patch 16 makes of 64²; `--compression 8x1` gives it 8x8), teacher forced: every token step of the
  window predicts its successor from the steps before it (causal time attention), as a change of tokens.
* AViT: 4 frames in (stacked in channels), the next frame out, as the_well trains it (`--avit-delta`
  makes it predict the change instead); every 4-frame context of the window is one sample (so each
  window gives it 4 next-frame targets).

Persistence (the last context frame repeated) is reported beside both: on Euler frames 0.015 apart
it is a strong one-step baseline.

Measured on the test split (context 4, horizon 8): one-step VRMSE (frame 1) and rollout VRMSE per frame,
averaged over fields (The Well's VRMSE, normalised fields), mean ± std over seeds; and the train-step
time ratio AViT/physnb (median seconds per optimiser step, the two models' steps interleaved in one run
on one thread, so machine load hits both alike). Goal: physnb at least as accurate at equal steps and no
slower per step (ratio >= 1).
"""
from __future__ import annotations

import argparse, json, os, platform, statistics, sys, time
from pathlib import Path

os.environ.setdefault('OMP_NUM_THREADS', '1')
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.peers import the_well_avit
from physnb.core import atomic_write, seed_everything
from physnb.metrics import vrmse
from physnb.sim.systems import SYSTEMS
from physnb.data.generate import generate_dataset
from physnb.data.windows import FieldWindows
from physnb.models.tokeniser import Tokeniser, TokeniserConfig
from physnb.models.processor import Processor, ProcessorConfig, DynamicsModel

torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
OUT = Path(__file__).resolve().parent / 'out' / 'dynamics.json'
CONTEXT, HORIZON, WINDOW = 4, 8, 8


def n_params(m): return sum(p.numel() for p in m.parameters())


def ours(field_names, width, latent, dim, depth, heads, compression):
    tok = Tokeniser(TokeniserConfig(field_names=list(field_names), width=width, latent=latent))
    return DynamicsModel(tok, Processor(ProcessorConfig(latent=latent, dim=dim, depth=depth, heads=heads)), compression)


def avit(C, res, target):
    "the_well's AViT whose parameter count is closest to `target` (hidden a multiple of 48: its GroupNorm has 12 groups)."
    AViT = the_well_avit()
    best = None
    for hidden in range(48, 769, 48):
        for blocks in range(1, 13):
            heads = next(h for h in (8, 6, 4, 3, 2, 1) if (hidden // h) % 2 == 0 or h == 1)
            m = AViT(dim_in=CONTEXT * C, dim_out=C, n_spatial_dims=2, spatial_resolution=(res, res), hidden_dim=hidden,
                     num_heads=heads, processor_blocks=blocks)
            gap = abs(n_params(m) / target - 1)
            if best is None or gap < best[0]: best = (gap, m, dict(hidden_dim=hidden, processor_blocks=blocks, num_heads=heads))
            if n_params(m) > 2 * target: break
    return best[1], best[2]


DELTA = False                                              # --avit-delta


def avit_step(model, x):                                   # x (B, T, C, H, W): every 4-frame context -> next frame
    B, T, C, H, W = x.shape
    ctx = torch.stack([x[:, i:i + CONTEXT] for i in range(T - CONTEXT)], 1).flatten(0, 1)   # (B·k, 4, C, H, W)
    nxt = torch.stack([x[:, i + CONTEXT] for i in range(T - CONTEXT)], 1).flatten(0, 1)     # (B·k, C, H, W)
    pred = avit_forward(model, ctx) + (ctx[:, -1] if DELTA else 0)
    return F.mse_loss(pred, nxt)


def avit_forward(model, ctx):                              # (N, 4, C, H, W) -> (N, C, H, W)
    inp = ctx.flatten(1, 2).movedim(1, -1)                 # (N, H, W, 4·C): time stacked in channels, channels last
    return model(inp).movedim(-1, 1)


@torch.no_grad()
def avit_rollout(model, ctx, frames):                      # (B, 4, C, H, W) -> (B, frames, C, H, W)
    out, window = [], ctx
    for _ in range(frames):
        nxt = avit_forward(model, window) + (window[:, -1] if DELTA else 0)
        out.append(nxt); window = torch.cat([window[:, 1:], nxt[:, None]], 1)
    return torch.stack(out, 1)


def ours_step(model, x, field_names):
    return F.mse_loss(model(x[:, :-1], field_names), x[:, 1:])


@torch.no_grad()
def rollout_vrmse(predict, test):                          # per frame, mean over fields and windows
    rows = []
    for x in torch.utils.data.DataLoader(test, batch_size=8):
        x = x['fields']
        pred = predict(x[:, :CONTEXT])
        rows.append(vrmse(pred.movedim(2, -1), x[:, CONTEXT:].movedim(2, -1)).mean(-1))     # (B, horizon)
    return torch.cat(rows).mean(0).tolist()


def run_seed(seed, root, args, report):
    train = FieldWindows(root, 'train', window=WINDOW, seed=seed)
    test = FieldWindows(root, 'test', window=CONTEXT + HORIZON, seed=seed)
    names, C = train.field_names, len(train.field_names)
    seed_everything(seed); a = ours(names, args.width, args.latent, args.dim, args.depth, args.heads, args.compression)
    seed_everything(seed); b, cfg = avit(C, args.res, n_params(a))
    report.setdefault('params', dict(physnb=n_params(a), avit=n_params(b), avit_config=cfg,
                                     physnb_config=dict(width=args.width, latent=args.latent, dim=args.dim, depth=args.depth,
                                                        heads=args.heads, compression=args.compression),
                                     ratio=n_params(b) / n_params(a)))
    opts = [torch.optim.AdamW(m.parameters(), lr=args.lr) for m in (a, b)]
    g = torch.Generator().manual_seed(seed)
    times = ([], [])
    for step in range(args.steps):
        idx = torch.randint(len(train), (args.batch,), generator=g).tolist()
        x = torch.stack([train[i]['fields'] for i in idx])                                   # the same batch for both
        for k, (model, opt) in enumerate(zip((a, b), opts)):
            t0 = time.perf_counter()
            loss = ours_step(model, x, names) if k == 0 else avit_step(model, x)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
            times[k].append(time.perf_counter() - t0)
    a.eval(); b.eval()
    ra = rollout_vrmse(lambda ctx: a.rollout(ctx, names, HORIZON), test)
    rb = rollout_vrmse(lambda ctx: avit_rollout(b, ctx, HORIZON), test)
    rp = rollout_vrmse(lambda ctx: ctx[:, -1:].expand(-1, HORIZON, -1, -1, -1), test)
    return dict(seed=seed, physnb=ra, avit=rb, persistence=rp, step_seconds=dict(physnb=statistics.median(times[0][5:]),
                                                                 avit=statistics.median(times[1][5:])))


def mean_std(v):
    m = sum(v) / len(v)
    return m, (statistics.stdev(v) if len(v) > 1 else 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='32², 30 steps, one seed (a smoke run)')
    ap.add_argument('--seeds', type=int, default=2)
    ap.add_argument('--steps', type=int, default=300)
    ap.add_argument('--res', type=int, default=64)
    ap.add_argument('--n-traj', type=int, default=24)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--lr', type=float, default=1e-3)
    ap.add_argument('--width', type=int, default=32)
    ap.add_argument('--latent', type=int, default=16)
    ap.add_argument('--dim', type=int, default=96)
    ap.add_argument('--depth', type=int, default=4)
    ap.add_argument('--heads', type=int, default=4)
    ap.add_argument('--compression', default='16x1', help="the kit's token level (16x1: AViT's 4x4 grid at 64²)")
    ap.add_argument('--avit-delta', action='store_true', help='AViT predicts the change of the last frame (the_well: the frame)')
    ap.add_argument('--data', default=str(Path(__file__).resolve().parent / 'out' / 'data'))
    args = ap.parse_args()
    if args.quick: args.seeds, args.steps, args.n_traj = 1, 30, 8
    global DELTA; DELTA = args.avit_delta
    report = dict(problem=f'euler four-quadrant, {args.res}², windows of {WINDOW}, rollout {CONTEXT} -> {HORIZON}',
                  steps=args.steps, batch=args.batch, avit_predicts='change' if DELTA else 'frame', lr=args.lr, threads=torch.get_num_threads(),
                  machine=platform.processor() or platform.machine())
    root = generate_dataset(SYSTEMS['euler'], args.data, n_traj=args.n_traj, res=args.res, steps=CONTEXT + HORIZON + 2, seed=0,
                            progress=False, name=f'euler_{args.res}px_{args.n_traj}traj')['root']
    runs = [run_seed(s, root, args, report) for s in range(args.seeds)]
    for k in ('physnb', 'avit', 'persistence'):
        report[k] = dict(one_step=mean_std([r[k][0] for r in runs]), rollout_end=mean_std([r[k][-1] for r in runs]),
                         rollout=[mean_std([r[k][i] for r in runs])[0] for i in range(HORIZON)])
        if k != 'persistence': report[k]['step_seconds'] = statistics.median(r['step_seconds'][k] for r in runs)
    report['step_time_ratio_avit_over_physnb'] = report['avit']['step_seconds'] / report['physnb']['step_seconds']
    report['runs'] = runs
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(OUT) as f: json.dump(report, f, indent=1)
    p = report['params']
    print(f"params: physnb {p['physnb']:,}  AViT {p['avit']:,} ({p['avit_config']}), ratio {p['ratio']:.3f}")
    for k in ('physnb', 'avit', 'persistence'):
        r = report[k]
        print(f"{k:11s} one-step VRMSE {r['one_step'][0]:.3f} ± {r['one_step'][1]:.3f}   rollout end {r['rollout_end'][0]:.3f} ± "
              f"{r['rollout_end'][1]:.3f}" + (f"   {r['step_seconds'] * 1e3:.0f} ms/step" if 'step_seconds' in r else ''))
    print(f"train-step time ratio AViT/physnb: {report['step_time_ratio_avit_over_physnb']:.2f} (>= 1: physnb no slower)")


if __name__ == '__main__':
    main()
