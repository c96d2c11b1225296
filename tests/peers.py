"""Peer solvers used as oracles by tests/ and bench/ (never by physnb itself)."""
from __future__ import annotations
import os, tempfile, time

import numpy as np

PYRO_PLAIN = {'compressible.cvisc': 0.0, 'compressible.use_flattening': 0, 'compressible.limiter': 1}  # closest to MUSCL-Hancock


def pyro_quad(n: int,                   # cells per side of the unit box
              t_end: float,             # final time
              states,                   # (4, 4): per quadrant 1..4 (upper right, upper left, lower left, lower right), (ρ, u, v, p)
              split=(0.8, 0.8),         # the cut (x_s, y_s)
              gamma: float = 1.4,
              boundary: str = 'open',   # 'open' (pyro's outflow) or 'periodic'
              cfl: float = 0.8,
              settings: dict | None = None,  # more pyro runtime parameters, e.g. PYRO_PLAIN
             ) -> dict:
    """Run pyro-hydro's compressible solver on its 'quad' problem with our states: conserved fields (4, n, n) as
    (ρ, ρu, ρv, E) indexed [x, y], steps taken and wall seconds of `run_sim`. pyro writes `inputs.auto` into the
    working directory, so it runs in a temporary one."""
    import pyro
    params = {'mesh.nx': n, 'mesh.ny': n, 'driver.tmax': t_end, 'driver.cfl': cfl, 'driver.max_steps': 10**6,
              'eos.gamma': gamma, 'quadrant.cx': split[0], 'quadrant.cy': split[1]}
    bc = {'open': 'outflow', 'periodic': 'periodic'}[boundary]
    for side in ('xlboundary', 'xrboundary', 'ylboundary', 'yrboundary'): params[f'mesh.{side}'] = bc
    for q in range(4):
        for k, name in enumerate(('rho', 'u', 'v', 'p')): params[f'quadrant.{name}{q + 1}'] = float(states[q][k])
    params.update(settings or {})
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            sim = pyro.Pyro('compressible')
            sim.initialize_problem('quad', inputs_dict=params)
            t0 = time.perf_counter(); sim.run_sim(); wall = time.perf_counter() - t0
        finally: os.chdir(cwd)
    U = np.stack([np.array(sim.get_var(k).v()) for k in ('density', 'x-momentum', 'y-momentum', 'energy')])
    return dict(U=U, t=float(sim.get_sim().cc_data.t), steps=int(sim.get_sim().n), wall=wall)


def the_well_avit():
    """the_well 1.2.0's `AViT` baseline class (`the_well.benchmark.models.AViT`).

    the_well's models package imports `timm` (which needs a torchvision built for the installed torch) for
    `DropPath` and `trunc_normal_`, which AViT uses only with `drop_path > 0`. When timm is not installed, a
    stand-in module gives those two names (DropPath refuses any p > 0), so AViT itself runs unchanged."""
    import importlib, sys, types
    try: importlib.import_module('timm.layers')
    except ImportError:
        import torch
        class DropPath(torch.nn.Module):
            def __init__(self, p=0.0, *args, **kwargs):
                super().__init__()
                if p: raise NotImplementedError('the timm stand-in supports drop_path=0 only: pip install timm for more')
            def forward(self, x): return x
        for name in ('timm', 'timm.layers', 'timm.models', 'timm.models.layers'):
            mod = sys.modules.setdefault(name, types.ModuleType(name))
            mod.DropPath, mod.trunc_normal_ = DropPath, torch.nn.init.trunc_normal_
    from the_well.benchmark.models import AViT
    return AViT
