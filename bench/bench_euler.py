"""Benchmark physnb.sim.euler against pyro-hydro on the four-quadrant Riemann problem, in one run.

Run: `OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/bench_euler.py [--quick]`. Writes bench/out/euler.json.

Problem: Lax & Liu's configuration 3 (physnb.sim.euler.LAX_LIU_3, the states of pyro's `quad` problem with
ρ1 = 1.5) on the unit box, cut at (0.8, 0.8), open (outflow) boundaries, γ = 1.4, CFL 0.8, to t = 0.8.

* Speed: seconds per trajectory. pyro-hydro (4.5.1, unsplit CTU + HLLC, its default settings: 4th-order MC
  limiter, flattening, artificial viscosity; numba kernels, warmed up first) runs one trajectory per call.
  physnb runs a batch of `--batch` (16) trajectories (each its own γ-scaled copy is not needed: the same
  problem 16 times) and we divide by the batch; float32 (the kit's data default) and float64, eager and
  torch.compile'd (compile time reported separately, not in the per-trajectory figure). One CPU thread.
  Ratio = pyro seconds per trajectory / physnb seconds per trajectory. Goal: ≥ 20× (float32, batch 16, 128²).
* Agreement: relative L1 difference of each conserved field between the two codes at t = 0.8, on 64² and
  128², next to physnb's own discretisation error (its n² solution against its 2n² solution averaged onto n²).
"""
from __future__ import annotations

import argparse, json, os, platform, sys, time
from pathlib import Path

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('NUMBA_NUM_THREADS', '1')
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.peers import pyro_quad
from physnb.core import atomic_write
from physnb.sim.euler import EulerSolver, four_quadrants, LAX_LIU_3

torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
OUT = Path(__file__).resolve().parent / 'out' / 'euler.json'
STATES, SPLIT = LAX_LIU_3['states'], LAX_LIU_3['split']


def physnb_run(n, t_end, batch=1, dtype=torch.float64, compile=False):
    "Conserved fields of the first trajectory (4, n, n), steps, and wall seconds (after any compile warm-up)."
    s = EulerSolver(n, gamma=torch.full((batch,), 1.4), boundary='open', cfl=0.8, dtype=dtype, compile=compile)
    U0 = s.conserved(four_quadrants(s.x, s.y, torch.tensor(STATES, dtype=dtype).expand(batch, 4, 4), SPLIT))
    compile_s = 0.
    if compile:                                          # first calls compile; time them apart
        t0 = time.perf_counter(); s.advance(U0, 0., 1e-3); compile_s = time.perf_counter() - t0
    t0 = time.perf_counter(); U, _, steps = s.advance(U0, 0., t_end); wall = time.perf_counter() - t0
    return U[0].double().numpy(), steps, wall, compile_s


def rel_l1(a, b): return (np.abs(a - b).mean((1, 2)) / np.abs(b).mean((1, 2))).round(5).tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='64² and t = 0.2 only (a smoke run)')
    ap.add_argument('--batch', type=int, default=16)
    args = ap.parse_args()
    n_speed, t_end = (64, 0.2) if args.quick else (128, 0.8)
    pyro_quad(16, 0.05, STATES, SPLIT)                   # numba warm-up
    out = dict(problem='Lax-Liu configuration 3, open boundaries, gamma 1.4, cfl 0.8', t_end=t_end,
               threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(), speed={}, agreement={})
    peer = pyro_quad(n_speed, t_end, STATES, SPLIT)
    out['speed']['pyro'] = dict(n=n_speed, steps=peer['steps'], s_per_traj=peer['wall'])
    print(f"pyro-hydro {n_speed}²: {peer['steps']} steps, {peer['wall']:.2f} s per trajectory")
    for dtype in (torch.float32, torch.float64):
        for compile in (False, True):
            _, steps, wall, cs = physnb_run(n_speed, t_end, args.batch, dtype, compile)
            per = wall / args.batch
            key = f"physnb_{str(dtype).split('.')[-1]}_{'compiled' if compile else 'eager'}"
            out['speed'][key] = dict(n=n_speed, batch=args.batch, steps=steps, s_per_traj=per, compile_s=cs,
                                     ratio=peer['wall'] / per)
            print(f"{key:28s} batch {args.batch}: {steps} steps, {per:.3f} s per trajectory "
                  f"(compile {cs:.1f} s) -> {peer['wall'] / per:.1f}x pyro")
    sizes = (32, 64) if args.quick else (64, 128)
    ours = {n: physnb_run(n, t_end)[0] for n in (*sizes, 2 * sizes[-1])}
    for n in sizes:
        theirs = pyro_quad(n, t_end, STATES, SPLIT)['U']
        fine = ours[2 * n].reshape(4, n, 2, n, 2).mean((2, 4))
        out['agreement'][n] = dict(physnb_vs_pyro=rel_l1(ours[n], theirs), physnb_n_vs_2n=rel_l1(ours[n], fine))
        print(f"{n}² relative L1 (ρ, ρu, ρv, E): physnb vs pyro {out['agreement'][n]['physnb_vs_pyro']}, "
              f"physnb {n}² vs {2 * n}² {out['agreement'][n]['physnb_n_vs_2n']}")
    OUT.parent.mkdir(exist_ok=True)
    with atomic_write(OUT) as f: f.write(json.dumps(out, indent=1))
    print('wrote', OUT)


if __name__ == '__main__':
    main()
