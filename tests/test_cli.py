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

def test_generate_writes_a_well_dataset_and_resumes_by_split(tmp_path):
    args = ('generate', 'gray_scott', '--out', tmp_path, '--n-traj', 10, '--res', 16, '--steps', 3, '--seed', 5, '--device', 'cpu')
    physnb(*args)
    root = tmp_path / 'gray_scott'
    written = files(root)
    assert {p.parent.name for p in written} == {'train', 'valid', 'test'} and (root / 'stats.yaml').exists()
    with h5py.File(written[0]) as f: first = f['t0_fields/A'][...]
    mtimes = {p: p.stat().st_mtime_ns for p in written}
    # a second run finds every split complete and rewrites nothing
    physnb(*args)
    assert {p: p.stat().st_mtime_ns for p in files(root)} == mtimes
    # a lost split (say, a run killed while writing it) is regenerated, identically
    lost = next(p for p in written if p.parent.name == 'valid')
    with h5py.File(lost) as f: before = f['t0_fields/B'][...]
    lost.unlink()
    physnb(*args)
    with h5py.File(lost) as f: np.testing.assert_array_equal(f['t0_fields/B'][...], before)
    with h5py.File(written[0]) as f: np.testing.assert_array_equal(f['t0_fields/A'][...], first)

def test_info_summarises_files_and_directories(tmp_path):
    physnb('generate', 'acoustics', '--out', tmp_path, '--n-traj', 3, '--res', 16, '--steps', 2, '--device', 'cpu')
    text = physnb('info', tmp_path / 'acoustics').stdout
    assert 'pressure' in text and 'train' in text
    summary = json.loads(physnb('info', files(tmp_path)[0], '--json').stdout)
    assert summary['kind'] == 'file'

def test_params_are_fixed_and_checked(tmp_path):
    physnb('generate', 'gray_scott', '--out', tmp_path, '--n-traj', 2, '--res', 16, '--steps', 2, '--params', 'F=0.03', 'k=0.062', '--device', 'cpu')
    for p in files(tmp_path):
        with h5py.File(p) as f: np.testing.assert_allclose(f['scalars/F'][...], 0.03)
    r = physnb('generate', 'gray_scott', '--out', tmp_path, '--params', 'F=7', check=False)
    assert r.returncode == 2 and 'F' in r.stderr and 'range' in r.stderr

def test_bad_input_gets_a_clear_error(tmp_path):
    r = physnb('generate', 'burgers', '--out', tmp_path, check=False)
    assert r.returncode == 2 and "'gray_scott'" in r.stderr
    r = physnb('generate', 'ns2d', '--out', tmp_path, '--split', 'sometimes', check=False)
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
