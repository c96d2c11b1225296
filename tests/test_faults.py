"""Faults a user meets: a rerun with other arguments, a full disk, a kill or SIGTERM mid-write, a bad output path.
Each test is one case of the adversarial trial (issue 12); nothing a user made may be lost, nothing half-written kept."""
import errno, json, os, signal, subprocess, sys, textwrap
from pathlib import Path

import h5py, numpy as np, pytest

import physnb.data.well as well
import physnb.data.generate as generate
from physnb.core import Interrupted, interruptible
from physnb.data.generate import generate_dataset
from physnb.sim.systems import SYSTEMS
from physnb.cli import parse_params

EXE = Path(sys.executable).parent / 'physnb'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PHYSNB_PROGRESS': '0'}

def physnb(*args):
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)

def snapshot(root):
    "Every file under `root` with its size and content hash (what a user would lose)."
    return {p.relative_to(root): p.read_bytes() for p in sorted(Path(root).rglob('*')) if p.is_file()}

def temporaries(root):
    return [p for p in Path(root).rglob('.*.tmp')]

GEN = ('generate', 'gray_scott', '--res', 16, '--device', 'cpu')


def test_a_rerun_with_other_arguments_is_refused_and_overwrite_replaces_on_purpose(tmp_path):
    assert physnb(*GEN, '--out', tmp_path, '--n-traj', 6, '--steps', 4).returncode == 0
    before = snapshot(tmp_path)
    r = physnb(*GEN, '--out', tmp_path, '--n-traj', 3, '--steps', 2)
    assert r.returncode == 2, r.stderr
    assert 'another request' in r.stderr and "steps 4 on disk, 2 asked" in r.stderr and '--overwrite' in r.stderr, r.stderr
    assert snapshot(tmp_path) == before                                  # nothing touched
    r = physnb(*GEN, '--out', tmp_path, '--n-traj', 6, '--steps', 4, '--seed', 1)
    assert r.returncode == 2 and 'the seed' in r.stderr and snapshot(tmp_path) == before
    r = physnb(*GEN, '--out', tmp_path, '--n-traj', 3, '--steps', 2, '--overwrite')
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / 'gray_scott/data/train/gray_scott_train_0000.hdf5') as f:
        assert f['t0_fields/A'].shape[:2] == (1, 3)                       # 1 train trajectory, steps 2 -> 3 frames
    assert physnb(*GEN, '--out', tmp_path, '--n-traj', 3, '--steps', 2).returncode == 0   # the same request resumes


def test_a_more_files_rerun_is_refused_and_overwrite_removes_the_extra_files(tmp_path):
    kw = dict(res=16, steps=2, seed=0, progress=False, device='cpu')
    generate_dataset(SYSTEMS['gray_scott'], tmp_path, n_traj=10, chunk=4, **kw)
    with pytest.raises(ValueError, match='holds files this run would not write'):
        generate_dataset(SYSTEMS['gray_scott'], tmp_path, n_traj=3, **kw)
    out = generate_dataset(SYSTEMS['gray_scott'], tmp_path, n_traj=3, overwrite=True, **kw)
    assert sorted(tmp_path.rglob('*.hdf5')) == sorted(p for v in out['files'].values() for p in v)


def test_a_damaged_file_is_remade_not_refused(tmp_path):
    "A file that is not a whole Well file has nothing readable to lose: it is remade, like a missing one."
    kw = dict(n_traj=3, res=16, steps=2, seed=0, progress=False, device='cpu')
    out = generate_dataset(SYSTEMS['gray_scott'], tmp_path, **kw)
    victim = out['files']['valid'][0]; good = victim.read_bytes(); victim.write_bytes(b'not hdf5 at all')
    again = generate_dataset(SYSTEMS['gray_scott'], tmp_path, **kw)
    assert victim not in again['skipped'] and victim.read_bytes() == good


def test_disk_full_is_a_clear_error_before_simulating_the_rest(tmp_path, monkeypatch):
    "The first simulated file's size, times the trajectories left, is checked against the free space."
    import physnb.core as core
    monkeypatch.setattr(core.shutil, 'disk_usage', lambda p: type('U', (), {'free': 50_000})())
    with pytest.raises(OSError, match=r'no space left on the filesystem of .*gray_scott .*needs about .* MB, 0.0 MB free') as e:
        generate_dataset(SYSTEMS['gray_scott'], tmp_path, n_traj=30, res=32, steps=20, progress=False, device='cpu')
    assert e.value.errno == errno.ENOSPC
    assert list(tmp_path.rglob('*.hdf5')) == [] and temporaries(tmp_path) == []


def test_disk_full_while_writing_removes_the_partial_file(tmp_path, monkeypatch):
    "ENOSPC from the file system itself (here /dev/full) ends in a named error and no temporary."
    real_open = open
    def full_open(path, mode='r', *a, **kw):
        if 'w' in mode and str(path).endswith('.tmp'):
            real_open(path, mode).close()
            return real_open('/dev/full', mode)
        return real_open(path, mode, *a, **kw)
    if not Path('/dev/full').exists(): pytest.skip('/dev/full is not available here')
    monkeypatch.setattr(well, 'open', full_open, raising=False)
    with pytest.raises(OSError, match=r'no space left on device writing .*gray_scott_train_0000.hdf5 \(needed about .* MB') as e:
        generate_dataset(SYSTEMS['gray_scott'], tmp_path, n_traj=3, res=16, steps=2, progress=False, device='cpu')
    assert e.value.errno == errno.ENOSPC and temporaries(tmp_path) == [] and list(tmp_path.rglob('*.hdf5')) == []
    r = physnb(*GEN, '--out', tmp_path, '--n-traj', 3, '--steps', 2)         # the next run simply works
    assert r.returncode == 0, r.stderr


KILLER = textwrap.dedent('''
    import os, signal, sys
    import physnb.data.well as well
    from physnb.cli import main
    real_open, calls = open, []
    class Dying:
        "A file that receives SIGTERM half-way through its write, then goes on writing, as a real write would."
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *a): self.f.close()
        def write(self, data):
            self.f.write(bytes(data[:len(data) // 2])); os.kill(os.getpid(), signal.{sig}); return self.f.write(bytes(data[len(data) // 2:]))
    def dying_open(path, mode='r', *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if 'w' in mode and str(path).endswith('.tmp'):
            calls.append(path)
            if len(calls) == 2: return Dying(f)          # the second file: the first is whole and stays
        return f
    well.open = dying_open
    sys.exit(main(sys.argv[1:]))
''')

@pytest.mark.parametrize('sig, code', [('SIGTERM', 143), ('SIGINT', 130)])
def test_sigterm_or_ctrl_c_mid_write_ends_nonzero_and_leaves_no_temporary(tmp_path, sig, code):
    script = tmp_path / 'killer.py'; script.write_text(KILLER.format(sig=sig))
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, str(script), *map(str, GEN), '--out', str(out), '--n-traj', '3', '--steps', '2'],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert f'stopped by {sig}' in r.stderr and 'no partial files left' in r.stderr
    assert temporaries(out) == []
    written = sorted(out.rglob('*.hdf5'))
    assert len(written) == 1; well.check_well_file(written[0])          # the file finished before the signal is whole
    assert physnb(*GEN, '--out', out, '--n-traj', 3, '--steps', 2).returncode == 0     # and the run resumes


def test_kill_9_leftovers_are_removed_when_the_run_resumes(tmp_path):
    assert physnb(*GEN, '--out', tmp_path, '--n-traj', 3, '--steps', 2).returncode == 0
    split = tmp_path / 'gray_scott/data/train'
    stale = split / '.gray_scott_train_0000.hdf5.k9x2ab.tmp'; stale.write_bytes(b'\0' * 4096)   # what kill -9 leaves
    (split / 'gray_scott_train_0000.hdf5').unlink()
    r = physnb(*GEN, '--out', tmp_path, '--n-traj', 3, '--steps', 2)
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and temporaries(tmp_path) == []
    assert json.loads(r.stdout)['removed_temporaries'] == [str(stale)]


def test_a_bad_output_location_fails_before_simulating_and_names_the_path(tmp_path):
    afile = tmp_path / 'not_a_folder'; afile.write_text('x')
    r = physnb(*GEN, '--out', afile, '--n-traj', 3, '--steps', 2)
    assert r.returncode == 2 and f'{afile} is a file, not a folder' in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr


def test_a_read_only_output_fails_before_simulating(tmp_path, monkeypatch):
    calls = []
    sysm = SYSTEMS['gray_scott']
    monkeypatch.setattr(type(sysm), 'simulate', lambda *a, **k: calls.append(1))
    def denied(*a, **kw): raise PermissionError(errno.EACCES, 'Permission denied')
    monkeypatch.setattr(generate.tempfile, 'mkstemp', denied)
    with pytest.raises(PermissionError, match=f'cannot write the dataset to {tmp_path}/gray_scott: Permission denied'):
        generate_dataset(sysm, tmp_path, n_traj=3, res=16, steps=2, progress=False, device='cpu')
    assert calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason='root ignores file permissions')
def test_a_read_only_folder_is_refused_by_the_cli(tmp_path):
    ro = tmp_path / 'ro'; ro.mkdir(); ro.chmod(0o555)
    try:
        r = physnb(*GEN, '--out', ro, '--n-traj', 3, '--steps', 2)
        assert r.returncode == 2 and f'{ro}' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    finally: ro.chmod(0o755)


def test_a_parameter_given_twice_is_an_error():
    with pytest.raises(ValueError, match='gives F twice'): parse_params(['F=0.03', 'F=0.05'])
    assert parse_params(['F=0.03', 'k=0.06']) == {'F': 0.03, 'k': 0.06}


# ---------------------------------------------------------------- checkpoints

import torch
from torch import nn
from dataclasses import asdict
from physnb.core import save_checkpoint, load_checkpoint
from physnb.models.tokeniser import Tokeniser, TokeniserConfig, save_tokeniser, load_tokeniser
from physnb.train.trainer import TrainConfig, Trainer

def garble(path):
    "Overwrite the middle of a safetensors file's tensor bytes with 0xFF (NaN in float32), leaving its header whole."
    b = bytearray(path.read_bytes()); start = 8 + int.from_bytes(b[:8], 'little')
    mid = (start + len(b)) // 2; b[mid:mid + 64] = b'\xff' * 64; path.write_bytes(bytes(b))

def small_tokeniser(**kw):
    torch.manual_seed(0); return Tokeniser(TokeniserConfig(field_names=['u', 'v'], width=8, latent=4, **kw))

def test_a_checkpoint_with_garbled_tensor_bytes_is_refused(tmp_path):
    p = save_tokeniser(tmp_path / 'tok.safetensors', small_tokeniser())
    garble(p)
    with pytest.raises(ValueError, match=r"tok.safetensors' is damaged: its tensor bytes do not match the checksum"): load_tokeniser(p)
    with pytest.raises(ValueError, match='is damaged'): load_checkpoint(p)

def test_a_config_that_does_not_fit_the_weights_names_the_file(tmp_path):
    small, wide = small_tokeniser(), Tokeniser(TokeniserConfig(field_names=['u', 'v'], width=16, latent=4))
    p = save_checkpoint(tmp_path / 'mixed.safetensors', config=asdict(wide.config), model=small.state_dict())
    with pytest.raises(ValueError, match=r"mixed.safetensors': its weights do not fit the tokeniser its config describes \(size mismatch"):
        load_tokeniser(p)

def _trainer(out_dir):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0); x = torch.randn(32, 1, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, 2 * x)
    return Trainer(nn.Conv1d(1, 1, 3, padding=1), data, config=TrainConfig(epochs=1, batch_size=8, device='cpu', progress=False,
                                                                         out_dir=str(out_dir)))

def test_resume_refuses_a_garbled_run_and_a_checkpoint_of_another_kind(tmp_path):
    _trainer(tmp_path / 'run').fit()
    garble(tmp_path / 'run' / 'last.safetensors')
    with pytest.raises(ValueError, match='last.safetensors.* is damaged'): _trainer(tmp_path / 'run').fit()
    other = tmp_path / 'other'; other.mkdir()
    save_tokeniser(other / 'last.safetensors', small_tokeniser())
    with pytest.raises(ValueError, match=r"holds a tokeniser \(save_tokeniser\) with parts \['config', 'model'\], not a run to resume"):
        _trainer(other).fit()

def test_non_finite_weights_saved_from_a_diverged_run_are_refused_on_load(tmp_path):
    tok = small_tokeniser()
    with torch.no_grad(): next(tok.parameters()).view(-1)[0] = float('nan')
    p = save_tokeniser(tmp_path / 'diverged.safetensors', tok)                # the checksum is right; the values are not
    with pytest.raises(ValueError, match=r"holds non-finite values \(NaN or inf\) in 1 tensor\(s\), e.g. 'model/"): load_tokeniser(p)


# ---------------------------------------------------------------- datasets do not trust their files

from physnb.data.well import WellFormatError, check_well_file
from physnb.data.datasets import WellDataset

@pytest.fixture
def dataset(tmp_path):
    return generate_dataset(SYSTEMS['gray_scott'], tmp_path, n_traj=5, res=16, steps=4, seed=0, progress=False, device='cpu',
                            fractions=(1, 0, 0))

def test_a_wrong_trajectory_count_is_refused_at_open_and_by_info(dataset):
    p = dataset['files']['train'][0]
    with h5py.File(p, 'r+') as f: f.attrs['n_trajectories'] = 50
    with pytest.raises(WellFormatError, match=f'{p.name}.*'): WellDataset(p, n_steps_input=1, n_steps_output=1)
    r = physnb('info', p)
    assert r.returncode != 0 and p.name in r.stderr, (r.returncode, r.stdout, r.stderr)

def test_a_nan_in_a_file_is_named_when_its_sample_is_served(dataset):
    p = dataset['files']['train'][0]
    with h5py.File(p, 'r+') as f: f['t0_fields/B'][2, 3, 5, 7] = np.nan
    ds = WellDataset(p, n_steps_input=1, n_steps_output=1)
    good = ds[0]                                                         # trajectory 0 is fine
    bad = next(i for i in range(len(ds)) if ds.locate(i)[1:] == (2, 2))  # trajectory 2, window starting at time 2
    with pytest.raises(WellFormatError, match=rf"{p.name}: field 'B', trajectory 2, time index 3 holds non-finite values"):
        ds[bad]

def test_a_bit_flip_inside_chunk_data_is_caught_by_the_checksum(dataset):
    p = dataset['files']['train'][0]
    with h5py.File(p) as f:
        d = f['t0_fields/A']; assert d.fletcher32
        offset = d.id.get_chunk_info(3).byte_offset + 17
    b = bytearray(p.read_bytes()); b[offset] ^= 0x01; p.write_bytes(bytes(b))   # one bit, a value that stays finite
    with pytest.raises(WellFormatError, match='t0_fields/A.*cannot be read'): check_well_file(p)
    ds = WellDataset(p, n_steps_input=1, n_steps_output=1)
    with pytest.raises(WellFormatError, match='cannot be read'): [ds[i] for i in range(len(ds))]


def test_a_float64_input_to_the_tokeniser_is_a_clear_error():
    tok = small_tokeniser(); x = torch.randn(1, 2, 2, 16, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"x is torch.float64 but the tokeniser's weights are torch.float32: pass x.to\(torch.float32\)"):
        tok.encode(x, ['u', 'v'], '8x1')
    assert tok.double().encode(x, ['u', 'v'], '8x1').dtype == torch.float64       # or convert the model


def test_sizes_beyond_the_machine_fail_at_once_with_the_estimate():
    for args in (('--res', 65536), ('--n-traj', 100_000_000, '--res', 64, '--steps', 10), ('--steps', 100_000_000, '--res', 256)):
        r = physnb('generate', 'gray_scott', '--out', '/nonexistent/never', *args)
        assert r.returncode == 2 and 'GiB in memory' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    r = physnb('preview', '--res', 4)
    assert r.returncode == 2 and '--res=4 must be >= 8' in r.stderr, r.stderr
    r = physnb('preview', '--systems', 'bogus', '--out', '/nonexistent/never')
    assert r.returncode == 2 and 'bogus' in r.stderr and 'Traceback' not in r.stderr, r.stderr


def test_the_main_job_checks_its_sizes_before_any_work(tmp_path):
    for args, msg in ((('--res', 4), 'res=4 must be >= 8'), (('--res', 36), 'divisible by the compression'),
                      (('--steps', 0), 'steps=0 must be >= 1'), (('--n-traj', 2), 'n_traj=2 must be >= 3')):
        r = physnb('main', '--out-dir', tmp_path / 'm', *args)
        assert r.returncode == 2 and msg in r.stderr and 'Traceback' not in r.stderr, (args, r.stderr)
    assert not (tmp_path / 'm').exists()


def test_a_garbled_stats_file_is_remade_on_resume(tmp_path):
    kw = dict(n_traj=3, res=16, steps=2, seed=0, progress=False, device='cpu')
    out = generate_dataset(SYSTEMS['gray_scott'], tmp_path, **kw)
    good = out['stats'].read_text(); out['stats'].write_text('mean: [this is: not: yaml')
    generate_dataset(SYSTEMS['gray_scott'], tmp_path, **kw)
    assert out['stats'].read_text() == good


# Housekeeping (issue 12, item 11)

def test_a_closed_pipe_ends_info_quietly(dataset):
    "`physnb info FILE | head` must not end in a BrokenPipe traceback; the reader here exits before physnb writes."
    r = subprocess.run(f"'{EXE}' info '{dataset['files']['train'][0]}' | true; echo \"rc=${{PIPESTATUS[0]}}\" >&2",
                       shell=True, executable='/bin/bash', capture_output=True, text=True, env=ENV, timeout=120)
    assert 'Traceback' not in r.stderr and 'BrokenPipe' not in r.stderr and 'rc=141' in r.stderr, r.stderr


def test_scratch_folders_go_with_the_process(tmp_path):
    code = "from physnb.core import scratch_dir; d = scratch_dir('physnb_demo_'); (d / 'x.bin').write_bytes(b'0' * 100); print(d)"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env={**ENV, 'TMPDIR': str(tmp_path)}, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().startswith(str(tmp_path)), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_every_notebook_that_makes_scratch_folders_removes_them_in_its_last_cell():
    "nbdev-test's workers may end without exit hooks, so a notebook removes its scratch folders itself (and uses no mkdtemp)."
    for path in sorted((Path(__file__).resolve().parents[1] / 'nbs').glob('*.ipynb')):
        cells = [''.join(c['source']) for c in json.loads(path.read_text())['cells'] if c['cell_type'] == 'code']
        assert not any('mkdtemp' in c for c in cells), f"{path.name}: use physnb.core.scratch_dir, which is removed at the end"
        if any('scratch_dir(' in c for c in cells):
            last = [c for c in cells if 'nbdev_export()' not in c][-1]
            assert 'remove_scratch()' in last, f"{path.name}: the last cell must call remove_scratch()"
