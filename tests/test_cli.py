"""The `physnb` command as a user runs it: a real subprocess, real files."""
import json, os, subprocess, sys
from pathlib import Path

import h5py, numpy as np, pytest

EXE = Path(sys.executable).parent / 'physnb'   # the console script pip installed beside this python
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PHYSNB_PROGRESS': '0'}

def physnb(*args, check=True):
    r = subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)
    if check and r.returncode != 0: raise AssertionError(f'physnb {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}')
    return r

def files(root):
    return sorted(Path(root).rglob('*.hdf5'))

def _fields(p):
    "Every dataset of a Well file (fields, scalars, dimensions), as numpy arrays by name."
    out = {}
    with h5py.File(p) as f: f.visititems(lambda k, d: out.__setitem__(k, d[...]) if isinstance(d, h5py.Dataset) else None)
    return out

def test_generate_writes_a_well_dataset_and_resumes_by_split(tmp_path):
    args = ('generate', 'gray_scott', '--out', tmp_path, '--n-traj', 10, '--res', 16, '--steps', 3, '--seed', 5, '--device', 'cpu')
    physnb(*args)
    root = tmp_path / 'gray_scott'
    written = files(root)
    assert {p.parent.name for p in written} == {'train', 'valid', 'test'} and (root / 'stats.yaml').exists()
    before = {p: _fields(p) for p in written}
    mtimes = {p: p.stat().st_mtime_ns for p in written}
    # a second run finds every split complete and rewrites nothing
    physnb(*args)
    assert {p: p.stat().st_mtime_ns for p in files(root)} == mtimes
    # lost files (say, a run killed while writing them) are regenerated bit-identically, in a fresh process:
    # the 1-trajectory valid file and the 8-trajectory train file, which holds both Gray-Scott IC families
    train = next(p for p in written if p.parent.name == 'train')
    valid = next(p for p in written if p.parent.name == 'valid')
    with h5py.File(train) as f:
        assert f.attrs['n_trajectories'] == 8 and set(json.loads(f.attrs['physnb_attrs'])['ic']) == {'gaussians', 'fourier'}
    train.unlink(); valid.unlink()
    physnb(*args)
    assert files(root) == written
    for p in written:
        again = _fields(p)
        assert again.keys() == before[p].keys(), p
        for k, v in before[p].items(): np.testing.assert_array_equal(again[k], v, err_msg=f'{p.name}: {k}')
    # the files that were whole were left alone
    assert {p: p.stat().st_mtime_ns for p in written if p not in (train, valid)} == {p: t for p, t in mtimes.items() if p not in (train, valid)}

def test_info_summarises_files_and_directories(tmp_path):
    physnb('generate', 'acoustics', '--out', tmp_path, '--n-traj', 3, '--res', 16, '--steps', 2, '--device', 'cpu')
    text = physnb('info', tmp_path / 'acoustics').stdout
    assert 'pressure' in text and 'train' in text
    train = next(p for p in files(tmp_path) if p.parent.name == 'train')
    summary = json.loads(physnb('info', train, '--json').stdout)
    assert summary['kind'] == 'file' and summary['dataset_name'] == 'acoustics'
    with h5py.File(train) as f: n, shape = f.attrs['n_trajectories'], f['t0_fields/pressure'].shape
    assert summary['n_trajectories'] == n == 1 and summary['n_steps'] == shape[1] == 3       # t = 0 and 2 saved steps
    assert summary['spatial_resolution'] == [16, 16] == list(shape[2:]) and summary['spatial_dims'] == ['x', 'y']
    assert 'pressure' in summary['channels']
    dataset = json.loads(physnb('info', tmp_path / 'acoustics', '--json').stdout)
    assert dataset['kind'] == 'dataset' and {s: v['n_trajectories'] for s, v in dataset['splits'].items()} == {'train': 1, 'valid': 1, 'test': 1}

def test_params_are_fixed_and_checked(tmp_path):
    physnb('generate', 'gray_scott', '--out', tmp_path, '--n-traj', 2, '--res', 16, '--steps', 2, '--params', 'F=0.03', 'k=0.062', '--device', 'cpu')
    for p in files(tmp_path):
        with h5py.File(p) as f: np.testing.assert_allclose(f['scalars/F'][...], 0.03)
    r = physnb('generate', 'gray_scott', '--out', tmp_path, '--params', 'F=7', check=False)
    assert r.returncode == 2 and 'F' in r.stderr and 'range' in r.stderr

def test_bad_input_gets_a_clear_error(tmp_path):
    r = physnb('generate', 'burgers', '--out', tmp_path, check=False)
    assert r.returncode == 2 and "'gray_scott'" in r.stderr
    r = physnb('generate', 'ns2d', '--out', tmp_path, '--param-split', 'sometimes', check=False)
    assert r.returncode == 2 and 'sometimes' in r.stderr and "'id'" in r.stderr
    r = physnb('info', tmp_path / 'nothing_here', check=False)
    assert r.returncode == 2 and 'nothing_here' in r.stderr
    bad = tmp_path / 'bad.hdf5'; bad.write_bytes(b'not an hdf5 file at all')
    r = physnb('info', bad, check=False)
    assert r.returncode == 2 and 'bad.hdf5' in r.stderr

def test_systems_lists_parameters_and_splits():
    out = physnb('systems').stdout
    for name in ('gray_scott', 'ns2d', 'shallow_water', 'acoustics', 'poisson', 'helmholtz'): assert name in out
    assert 'Reynolds' in out

def test_every_driver_is_a_subcommand_and_keeps_the_library_defaults():
    "Options are read from the functions' signatures: the help shows the code's defaults, so they cannot drift."
    import inspect
    from physnb.cli import COMMANDS
    from physnb.train.lejepa import run_lejepa
    from physnb.train.trainer import TrainConfig
    from physnb.models.lejepa import LeJEPAConfig
    out = physnb('--help').stdout
    assert all(name in out for name in ('generate', 'info', 'systems', 'main', 'pretrain', 'lejepa')) and set(COMMANDS) >= {'pretrain', 'lejepa'}
    text = ' '.join(physnb('lejepa', '--help').stdout.split())
    assert f'--lr LR AdamW learning rate (cosine) (default: {TrainConfig.lr})' in text
    assert f'(default: {LeJEPAConfig.proj_hidden})' in text and inspect.signature(run_lejepa).parameters['epochs'].default == TrainConfig.epochs
    r = physnb('lejepa', '--out-dir', 'x', check=False)                   # a required option is named
    assert r.returncode == 2 and '--data' in r.stderr


def test_pretrain_runs_from_the_command_line(tmp_path):
    r = physnb('pretrain', '--datasets', 'gray_scott', '--steps', 2, '--width', 8, '--latent', 4, '--n-traj', 3, '--res', 16,
               '--window', 4, '--compression-levels', '4x1,8x2', '--device', 'cpu', '--out-dir', tmp_path / 'run')
    printed = json.loads(r.stdout)
    assert printed['paths']['results'] == str(tmp_path / 'run' / 'results.json')
    saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert saved['schema'] == 'physnb.results/1' and saved['metrics']['steps'] == 2 and saved['parameters']['levels'] == ['4x1', '8x2']
