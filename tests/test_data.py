"Tests for physnb.data (well, stats, datasets, info, generate): The Well writer, checker, stats, reader, mixtures and generate_dataset."
import math, os, pickle, shutil

import h5py
import numpy as np
import pytest
import torch
import yaml

import physnb.data.well as well
from physnb.core import Trajectories
from physnb.data.well import BC_CODES, WellFormatError, check_well_file, read_well, write_well
from physnb.data.stats import Normaliser, compute_stats, load_stats, write_stats
from physnb.data.datasets import WellDataset, WellMixture
from physnb.core import derive_seed
from physnb.data.generate import generate_dataset, system_settings, split_counts, write_dataset
from physnb.data.info import info, info_text

torch.set_num_threads(1)


def wave(speeds=(0.5, 1.0), nx=16, ny=8, steps=5, dt=0.25, tensor=False, constant=False, bcs=('periodic', 'periodic')):
    "Analytic travelling wave u = sin(x - c t) cos(y), its gradient, optionally a tensor and a constant field."
    c = torch.tensor(speeds, dtype=torch.float32)[:, None, None, None]
    x = torch.arange(nx) * 2 * math.pi / nx; y = torch.arange(ny) * 2 * math.pi / ny
    t = torch.arange(steps) * dt
    X, Y = torch.meshgrid(x, y, indexing='ij'); ph = X - c * t[None, :, None, None]
    u = torch.sin(ph) * torch.cos(Y)
    grad = torch.stack([torch.cos(ph) * torch.cos(Y), -torch.sin(ph) * torch.sin(Y)], -1)
    fields = {'u': u, 'grad_u': grad}
    if tensor: fields['hess'] = torch.stack([torch.stack([-u, -grad[..., 1]], -1), torch.stack([-grad[..., 1], -u], -1)], -2)
    const = {'rho': 1 + 0.5 * torch.cos(X)[None].expand(len(speeds), nx, ny).clone()} if constant else {}
    return Trajectories(name='wave', fields=fields, time=t, coords={'x': x, 'y': y}, scalars={'speed': c.flatten()},
                        constant_fields=const, bcs=dict(zip('xy', bcs)), attrs={'system': 'wave', 'seed': 0})


@pytest.fixture
def wave_file(tmp_path):
    return write_well(wave(tensor=True, constant=True), tmp_path / 'wave.hdf5')


# ---------------------------------------------------------------- writer

def test_write_read_roundtrip_preserves_every_value(wave_file):
    w, back = wave(tensor=True, constant=True), read_well(wave_file)
    assert list(back.fields) == list(w.fields) and list(back.constant_fields) == ['rho']
    for k in w.fields: torch.testing.assert_close(back.fields[k], w.fields[k], rtol=0, atol=0)
    torch.testing.assert_close(back.constant_fields['rho'], w.constant_fields['rho'], rtol=0, atol=0)
    torch.testing.assert_close(back.scalars['speed'], w.scalars['speed'])
    torch.testing.assert_close(back.time, w.time); torch.testing.assert_close(back.coords['x'], w.coords['x'])
    assert back.bcs == w.bcs and back.attrs == w.attrs and back.name == 'wave'


def test_written_file_has_the_well_schema(wave_file):
    with h5py.File(wave_file) as f:
        for k in well.ROOT_ATTRS: assert k in f.attrs
        assert list(f.attrs['simulation_parameters']) == ['speed'] and f.attrs['speed'].shape == (2,)
        assert sorted(f) == ['boundary_conditions', 'dimensions', 'scalars', 't0_fields', 't1_fields', 't2_fields']
        assert list(f['t0_fields'].attrs['field_names']) == ['u', 'rho']
        u, rho, hess = f['t0_fields/u'], f['t0_fields/rho'], f['t2_fields/hess']
        assert u.dtype == np.float32 and u.chunks == (1, 1, 16, 8)           # one frame per chunk: lazy windows
        assert u.attrs['time_varying'] and not rho.attrs['time_varying'] and rho.shape == (2, 16, 8)
        assert hess.attrs['symmetric'] and not hess.attrs['antisymmetric']
        s = f['scalars/speed']; assert s.attrs['sample_varying'] and not s.attrs['time_varying'] and s.shape == (2,)
        assert f['dimensions/time'].attrs['time_varying'] and not f['dimensions/x'].attrs['time_varying']
    check_well_file(wave_file)


@pytest.mark.parametrize('bc', ['periodic', 'wall', 'open'])
def test_boundary_masks_mark_both_ends_and_read_back_as_codes(tmp_path, bc):
    p = write_well(wave(bcs=(bc, 'periodic')), tmp_path / 'w.hdf5')
    with h5py.File(p) as f:
        g = f[f'boundary_conditions/x_{bc}']; m = g['mask'][:]
        assert g.attrs['bc_type'] == bc.upper() and list(g.attrs['associated_dims']) == ['x']
        assert m.shape == (16,) and m[0] and m[-1] and not m[1:-1].any()
    s = WellDataset(p)[0]
    assert s['boundary_conditions'].tolist() == [[BC_CODES[bc.upper()]] * 2, [2, 2]]


def test_writer_refuses_nan_and_names_file_and_field(tmp_path):
    w = wave(); w.fields['grad_u'][1, 2, 3, 4, 0] = float('inf')
    with pytest.raises(WellFormatError, match=r"bad.hdf5: refusing to write: .*'grad_u'"): write_well(w, tmp_path / 'bad.hdf5')
    w = wave(); w.scalars['speed'][0] = float('nan')
    with pytest.raises(WellFormatError, match=r"scalar 'speed' has non-finite"): write_well(w, tmp_path / 'bad.hdf5')
    assert list(tmp_path.iterdir()) == []


def _dying(after, monkeypatch):
    "Make physnb.data.well._f32 raise KeyboardInterrupt (a kill) on its `after`-th call."
    real, calls = well._f32, []
    def f32(t):
        calls.append(1)
        if len(calls) == after: raise KeyboardInterrupt
        return real(t)
    monkeypatch.setattr(well, '_f32', f32)


def test_crash_mid_write_leaves_no_file_and_no_temp(tmp_path, monkeypatch):
    _dying(7, monkeypatch)  # dies while writing fields
    with pytest.raises(KeyboardInterrupt): write_well(wave(tensor=True), tmp_path / 'w.hdf5')
    assert list(tmp_path.iterdir()) == []


def test_crash_while_overwriting_keeps_the_old_file_whole(tmp_path, monkeypatch):
    p = write_well(wave(speeds=(0.1, 0.2)), tmp_path / 'w.hdf5')
    _dying(7, monkeypatch)
    with pytest.raises(KeyboardInterrupt): write_well(wave(speeds=(3.0, 4.0)), p)
    monkeypatch.undo()
    assert sorted(x.name for x in tmp_path.iterdir()) == ['w.hdf5']
    check_well_file(p); torch.testing.assert_close(read_well(p).scalars['speed'], torch.tensor([0.1, 0.2]))


# ---------------------------------------------------------------- checker

def _damaged(src, tmp_path, edit):
    p = tmp_path / 'bad.hdf5'; shutil.copy(src, p)
    with h5py.File(p, 'r+') as f: edit(f)
    return p


def _recreate(f, item, arr, **attrs):
    old = dict(f[item].attrs); del f[item]
    d = f.create_dataset(item, data=arr)
    for k, v in {**old, **attrs}.items(): d.attrs[k] = v


@pytest.mark.parametrize('edit, pattern', [
    (lambda f: f.__delitem__('t2_fields'), r"bad.hdf5: t2_fields: missing"),
    (lambda f: f.__delitem__('dimensions/time'), r"bad.hdf5: dimensions/time: missing"),
    (lambda f: f.attrs.__delitem__('n_trajectories'), r"bad.hdf5: /: attribute 'n_trajectories' missing"),
    (lambda f: f['t1_fields/grad_u'].attrs.__delitem__('dim_varying'), r"t1_fields/grad_u: attribute 'dim_varying' missing"),
    (lambda f: f['boundary_conditions/x_periodic'].attrs.__delitem__('bc_type'), r"boundary_conditions/x_periodic: attribute 'bc_type' missing"),
    (lambda f: f['boundary_conditions/x_periodic'].attrs.__setitem__('bc_type', 'SPONGE'), r"x_periodic: bc_type 'SPONGE' is not one of"),
    (lambda f: f['t0_fields'].attrs.__setitem__('field_names', ['u', 'rho', 'p']), r"t0_fields/p: missing"),
    (lambda f: _recreate(f, 't0_fields/u', np.zeros((2, 5, 16, 9), np.float32)), r"t0_fields/u: shape \(2, 5, 16, 9\) does not match expected \(2, 5, 16, 8\)"),
    (lambda f: _recreate(f, 't1_fields/grad_u', np.zeros((2, 4, 16, 8, 2), np.float32)), r"t1_fields/grad_u: shape \(2, 4, 16, 8, 2\) does not match expected \(2, 5, 16, 8, 2\)"),
    (lambda f: _recreate(f, 'scalars/speed', np.zeros(3, np.float32)), r"scalars/speed: shape \(3,\) does not match expected \(2,\)"),
    (lambda f: f['t0_fields/u'].__setitem__((1, 2, 3, 4), np.nan), r"t0_fields/u: 1 non-finite values \(NaN/inf\) \(trajectory 1\)"),
    (lambda f: f['t2_fields/hess'].__setitem__((0, 0, 0, 0, 1, 1), -np.inf), r"t2_fields/hess: 1 non-finite"),
    (lambda f: f['t0_fields/rho'].__setitem__((1, 0, 0), np.nan), r"t0_fields/rho: 1 non-finite"),
    (lambda f: f['dimensions/time'].__setitem__(3, 0.0), r"dimensions/time: times are not strictly increasing"),
    (lambda f: f.attrs.__setitem__('simulation_parameters', ['speed', 'nu']), r"simulation parameter 'nu' is listed but not a root attribute"),
])
def test_checker_names_file_and_item(wave_file, tmp_path, edit, pattern):
    with pytest.raises(WellFormatError, match=pattern): check_well_file(_damaged(wave_file, tmp_path, edit))


def test_truncated_file_is_a_clear_error_everywhere(wave_file, tmp_path):
    cut = tmp_path / 'cut.hdf5'; cut.write_bytes(wave_file.read_bytes()[:wave_file.stat().st_size * 2 // 3])
    for call in (check_well_file, read_well, WellDataset, info, lambda p: compute_stats([p])):
        with pytest.raises(WellFormatError, match=r"cut.hdf5: cannot be opened as HDF5 \(truncated or corrupt file\?\)"): call(cut)
    junk = tmp_path / 'junk.hdf5'; junk.write_bytes(b'not an hdf5 file' * 100)
    with pytest.raises(WellFormatError, match='junk.hdf5: cannot be opened'): check_well_file(junk)
    with pytest.raises(FileNotFoundError, match='nope.hdf5'): check_well_file(tmp_path / 'nope.hdf5')


def test_garbled_bytes_inside_field_data_are_caught(tmp_path):
    p = write_well(wave(), tmp_path / 'w.hdf5')
    with h5py.File(p) as f: off = f['t0_fields/u'].id.get_chunk_info(3).byte_offset   # the chunk of (trajectory 0, frame 3)
    raw = bytearray(p.read_bytes()); raw[off:off + 8] = b'\xff' * 8; p.write_bytes(bytes(raw))  # 0xffffffff is a NaN
    # the chunk's fletcher32 checksum catches it before any value is read
    with pytest.raises(WellFormatError, match=r"w.hdf5: t0_fields/u: data cannot be read .*filter returned failure"): check_well_file(p)


# ---------------------------------------------------------------- stats

def test_stats_match_numpy_on_the_full_array(tmp_path):
    files = [write_well(wave(speeds=s, tensor=True, constant=True), tmp_path / f'{i}.hdf5')
             for i, s in enumerate([(0.3, 0.7), (1.1,), (2.0, 0.1, 0.5)])]
    st = compute_stats(files, block_elems=97)  # tiny blocks: the streaming merge is exercised
    ws = [read_well(p) for p in files]
    for name, comp in (('u', 1), ('grad_u', 2), ('hess', 4)):
        full = np.concatenate([w.fields[name].double().numpy().reshape(-1, comp) for w in ws])
        delta = np.concatenate([np.diff(w.fields[name].double().numpy(), axis=1).reshape(-1, comp) for w in ws])
        for key, want in (('mean', full.mean(0)), ('std', full.std(0)), ('rms', np.sqrt((full ** 2).mean(0))),
                          ('mean_delta', delta.mean(0)), ('std_delta', delta.std(0)), ('rms_delta', np.sqrt((delta ** 2).mean(0)))):
            np.testing.assert_allclose(np.reshape(st[key][name], -1), want, rtol=1e-9, atol=1e-12, err_msg=f'{key}/{name}')
    assert isinstance(st['mean']['u'], float) and len(st['std']['grad_u']) == 2 and np.shape(st['rms']['hess']) == (2, 2)
    rho = np.concatenate([w.constant_fields['rho'].double().numpy().ravel() for w in ws])
    np.testing.assert_allclose(st['std']['rho'], rho.std(), rtol=1e-9)
    assert 'rho' not in st['std_delta'] or st['std_delta']['rho'] == 0.0


def test_stats_of_a_travelling_wave_are_exact(tmp_path):
    st = compute_stats([write_well(wave(), tmp_path / 'w.hdf5')])
    assert abs(st['mean']['u']) < 1e-7 and abs(st['rms']['u'] - 0.5) < 1e-6   # <sin² cos²> = 1/4 on the grid


def test_stats_are_robust_to_a_large_mean(tmp_path):
    w = wave(); w.fields['u'] = 1e4 + 1e-2 * w.fields['u'].double()
    st = compute_stats([write_well(w, tmp_path / 'w.hdf5')], block_elems=50)
    u = read_well(tmp_path / 'w.hdf5').fields['u'].double().numpy()
    np.testing.assert_allclose(st['std']['u'], u.std(), rtol=1e-6)


def test_single_step_files_get_zero_delta_stats(tmp_path):
    w = wave(steps=1)
    st = compute_stats([write_well(w, tmp_path / 'w.hdf5')])
    assert st['std_delta']['u'] == 0.0 and st['rms_delta']['grad_u'] == [0.0, 0.0] and st['std']['u'] > 0


def test_write_stats_is_yaml_the_well_can_read(tmp_path):
    st = compute_stats([write_well(wave(), tmp_path / 'w.hdf5')])
    p = write_stats(st, tmp_path / 'stats.yaml')
    assert yaml.safe_load(p.read_text()) == st and set(st) == {'mean', 'std', 'rms', 'mean_delta', 'std_delta', 'rms_delta'}


# ---------------------------------------------------------------- normalisation

@pytest.mark.parametrize('kind', ['zscore', 'rms'])
def test_normalisation_round_trip_and_moments(tmp_path, kind):
    p = write_well(wave(tensor=True, constant=True), tmp_path / 'w.hdf5')
    write_stats(compute_stats([p]), tmp_path / 'stats.yaml')
    raw = WellDataset(p, n_steps_output=0)
    ds = WellDataset(p, n_steps_output=0, normalisation=kind)
    assert ds.stats_path == tmp_path / 'stats.yaml'
    x = torch.stack([ds[i]['input_fields'][0] for i in range(len(ds))])
    m = x.pow(2).mean((0, 1, 2)).sqrt() if kind == 'rms' else x.std((0, 1, 2), unbiased=False)
    big = torch.tensor([s > 1e-3 for s in torch.stack([raw[i]['input_fields'][0] for i in range(len(raw))]).std((0, 1, 2))])
    torch.testing.assert_close(m[big], torch.ones(int(big.sum())), atol=1e-4, rtol=0)
    for i in (0, 7):
        torch.testing.assert_close(ds.denormalise(ds[i]['input_fields']), raw[i]['input_fields'], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ds.denormalise(ds[i]['constant_fields'], 'constant'), raw[i]['constant_fields'], atol=1e-5, rtol=1e-5)


def test_missing_stats_is_an_error_never_a_silent_skip(tmp_path):
    p = write_well(wave(), tmp_path / 'd' / 'data' / 'train' / 'w.hdf5')
    with pytest.raises(FileNotFoundError, match=r"normalisation='zscore' needs a stats.yaml; looked at .*d/stats.yaml"):
        WellDataset(tmp_path / 'd', split='train', normalisation='zscore')
    st = compute_stats([p])
    write_stats({k: v for k, v in st.items() if k != 'rms_delta'}, tmp_path / 'd' / 'stats.yaml')
    with pytest.raises(WellFormatError, match=r"stats.yaml: keys \['rms_delta'\] missing; normalisation='rms' needs"):
        WellDataset(tmp_path / 'd', split='train', normalisation='rms')
    WellDataset(tmp_path / 'd', split='train', normalisation='zscore')  # z-score has what it needs
    write_stats({**st, 'std': {'u': 1.0}}, tmp_path / 'd' / 'stats.yaml')
    with pytest.raises(WellFormatError, match=r"std: no entry for field 'grad_u'"):
        WellDataset(tmp_path / 'd', split='train', normalisation='zscore')
    with pytest.raises(ValueError, match="normalisation='minmax' is not one of"):
        WellDataset(tmp_path / 'd', split='train', normalisation='minmax')


def test_normaliser_clips_tiny_scales():
    n = Normaliser({'mean': {'a': 1.0}, 'std': {'a': 0.0}, 'mean_delta': {'a': 0.0}, 'std_delta': {'a': 0.0}}, [('a', 0)])
    torch.testing.assert_close(n.normalise(torch.tensor([1.0001])), torch.tensor([1.0]), atol=1e-3, rtol=0)


# ---------------------------------------------------------------- reader

def test_windows_count_and_content_with_stride(wave_file):
    w = wave(tensor=True, constant=True)
    ds = WellDataset(wave_file, n_steps_input=2, n_steps_output=1, dt_stride=2)
    assert len(ds) == 2 * (5 - 2 * 2) and ds.field_names == ['u', 'grad_u_x', 'grad_u_y', 'hess_xx', 'hess_xy', 'hess_yx', 'hess_yy']
    assert ds.constant_field_names == ['rho'] and ds.constant_scalar_names == ['speed']
    s = ds[1]   # trajectory 1, frames 0, 2 -> 4
    assert s['input_fields'].shape == (2, 16, 8, 7) and s['output_fields'].shape == (1, 16, 8, 7)
    torch.testing.assert_close(s['input_fields'][1, ..., 1:3], w.fields['grad_u'][1, 2])
    torch.testing.assert_close(s['output_fields'][0, ..., 3:].reshape(16, 8, 2, 2), w.fields['hess'][1, 4])
    torch.testing.assert_close(s['constant_fields'][..., 0], w.constant_fields['rho'][1])
    torch.testing.assert_close(s['input_time_grid'], torch.tensor([0.0, 0.5])); torch.testing.assert_close(s['output_time_grid'], torch.tensor([1.0]))
    assert s['space_grid'].shape == (16, 8, 2) and float(s['constant_scalars']) == 1.0


def test_getitem_reads_only_the_window(tmp_path, monkeypatch):
    p = write_well(wave(steps=40, nx=32, ny=32), tmp_path / 'long.hdf5')
    ds = WellDataset(p, n_steps_input=2, n_steps_output=1)
    read = []
    orig = h5py.Dataset.__getitem__
    def spy(self, idx):
        out = orig(self, idx); read.append(np.asarray(out).size); return out
    monkeypatch.setattr(h5py.Dataset, '__getitem__', spy)
    ds[25]
    field_values = 3 * 32 * 32 * 3          # 3 frames × grid × (u, grad_x, grad_y)
    assert sum(read) <= field_values + 200 and sum(read) < 40 * 32 * 32


def test_full_trajectory_and_steady_single_step_files(tmp_path):
    ds = WellDataset(write_well(wave(steps=6), tmp_path / 'w.hdf5'), n_steps_input=2, full_trajectory=True)
    assert len(ds) == 2 and ds[0]['output_fields'].shape == (4, 16, 8, 3)
    x = torch.linspace(0, 1, 8)
    steady = Trajectories(name='poisson', fields={'source': torch.randn(3, 1, 8, 8), 'solution': torch.randn(3, 1, 8, 8)},
                          time=torch.zeros(1), coords={'x': x, 'y': x}, scalars={'kappa': torch.tensor([1., 2., 3.])},
                          bcs={'x': 'wall', 'y': 'wall'})
    p = write_well(steady, tmp_path / 's.hdf5'); check_well_file(p)
    for ds in (WellDataset(p, n_steps_input=1, n_steps_output=0), WellDataset(p, full_trajectory=True)):
        s = ds[2]
        assert len(ds) == 3 and 'output_fields' not in s and s['input_fields'].shape == (1, 8, 8, 2)
        torch.testing.assert_close(s['input_fields'][0, ..., 1], steady.fields['solution'][2, 0])
        assert float(s['constant_scalars']) == 3.0 and (s['boundary_conditions'] == BC_CODES['WALL']).all()
    with pytest.raises(ValueError, match='too few'): WellDataset(p, n_steps_input=1, n_steps_output=1)


def test_seeded_subsets_are_distinct_nested_reproducible_and_span_files(tmp_path):
    for i in range(5): write_well(wave(speeds=tuple(float(4 * i + j) for j in range(4))), tmp_path / f'p{i}.hdf5')
    sub = lambda k, seed=0: WellDataset(tmp_path, n_trajectories=k, seed=seed)
    a, b, c = sub(4), sub(10), sub(20)
    assert len(set(a.trajectories)) == 4 and set(a.trajectories) <= set(b.trajectories) <= set(c.trajectories)
    assert len(c.trajectories) == 20 and len({fi for fi, _ in b.trajectories}) > 1
    assert a.trajectories == sub(4).trajectories and sub(4, seed=1).trajectories != a.trajectories
    speeds = sorted(float(b[i]['constant_scalars']) for i in range(0, len(b), 4))   # one sample per trajectory
    assert len(set(speeds)) == 10                                                  # really different trajectories
    assert len(sub(0.25).trajectories) == 5 and len(sub(1.0).trajectories) == 20 and len(b) == 10 * 4
    with pytest.raises(ValueError, match='between 1 and 20'): sub(21)


def test_folder_with_mixed_layouts_points_to_mixture(tmp_path):
    write_well(wave(), tmp_path / 'a.hdf5')
    w = wave(); w.fields['p'] = w.fields['u'] * 2; write_well(w, tmp_path / 'b.hdf5')
    with pytest.raises(WellFormatError, match='b.hdf5: fields/grid .* use WellMixture'): WellDataset(tmp_path)


def test_path_resolution_errors(tmp_path):
    write_well(wave(), tmp_path / 'ds' / 'data' / 'train' / 'a.hdf5')
    with pytest.raises(ValueError, match=r"is a dataset root; pass split= one of \['train'\]"): WellDataset(tmp_path / 'ds')
    with pytest.raises(FileNotFoundError, match=r"split 'test' not found; available: \['train'\]"): WellDataset(tmp_path / 'ds', split='test')
    with pytest.raises(ValueError, match=r"is a data folder; pass split= one of \['train'\]"): WellDataset(tmp_path / 'ds' / 'data')
    assert WellDataset(tmp_path / 'ds' / 'data', split='train').files == [tmp_path / 'ds' / 'data' / 'train' / 'a.hdf5']
    with pytest.raises(ValueError, match="split='valid' given, but .* is neither a dataset root"): WellDataset(tmp_path / 'ds' / 'data' / 'train', split='valid')
    assert len(WellDataset([tmp_path / 'ds' / 'data' / 'train', tmp_path / 'ds' / 'data' / 'train' / 'a.hdf5'])) == 2 * 2 * 4


def test_split_on_a_file_must_match_its_folder(tmp_path):
    "split= is never silently ignored: on a file (or a list of files) it must name the file's folder."
    loose = write_well(wave(), tmp_path / 'loose' / 'a.hdf5')
    with pytest.raises(ValueError, match=r"split='valid' given, but .*a.hdf5 is a file in folder 'loose'"): WellDataset(loose, split='valid')
    with pytest.raises(ValueError, match=r"split='test' given, but .*a.hdf5 is a file in folder 'loose'"): WellDataset([loose], split='test')
    valid = write_well(wave(), tmp_path / 'ds' / 'data' / 'valid' / 'v.hdf5')
    assert len(WellDataset(valid, split='valid')) == len(WellDataset([valid], split='valid')) == len(WellDataset(loose))
    with pytest.raises(ValueError, match="split='train' given, but .*v.hdf5 is a file in folder 'valid'"): WellDataset(valid, split='train')
    with pytest.raises(ValueError, match="split='valid' given, but .*a.hdf5 is a file in folder 'loose'"): WellDataset([valid, loose], split='valid')


def test_dataloader_workers_get_their_own_handles(tmp_path):
    p = write_well(wave(steps=6), tmp_path / 'w.hdf5')
    ds = WellDataset(p, n_steps_input=2)
    ds[0]                                    # parent opens a handle; workers must not share it
    clone = pickle.loads(pickle.dumps(ds)); assert clone._handles == {}
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context='fork')
    got = torch.cat([b['output_fields'] for b in dl])
    want = torch.stack([ds[i]['output_fields'] for i in range(len(ds))])
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- mixtures

def test_mixture_maps_samples_onto_the_union_of_channels(tmp_path):
    a = write_well(wave(), tmp_path / 'a' / 'a.hdf5')
    w = wave(speeds=(3.0,)); w.fields = {'h': 1 + w.fields['u'] ** 2, 'u': w.fields['u']}; w.scalars = {'depth': torch.tensor([5.0])}
    b = write_well(w, tmp_path / 'b' / 'b.hdf5')
    mix = WellMixture([WellDataset(a), WellDataset(b)])
    assert mix.field_names == ['u', 'grad_u_x', 'grad_u_y', 'h'] and len(mix) == 8 + 4
    sa, sb = mix[0], mix[11]
    assert sa['channel_mask'].tolist() == [True, True, True, False] and sb['channel_mask'].tolist() == [True, False, False, True]
    assert sa['input_fields'].shape == sb['input_fields'].shape == (1, 16, 8, 4)
    assert (sa['input_fields'][..., 3] == 0).all() and (sb['input_fields'][..., 1:3] == 0).all()
    torch.testing.assert_close(sb['output_fields'][0, ..., 0], w.fields['u'][0, 4])       # u lands in channel 0 in both
    torch.testing.assert_close(sb['output_fields'][0, ..., 3], w.fields['h'][0, 4])
    assert sa['constant_scalars'].tolist() == [0.5, 0.0] and sb['constant_scalars'].tolist() == [0.0, 5.0]
    assert sb['constant_scalar_mask'].tolist() == [False, True] and int(sb['dataset_index']) == 1
    batch = torch.utils.data.default_collate([mix[i] for i in (0, 5, 10)])
    assert batch['input_fields'].shape == (3, 1, 16, 8, 4)


def test_mixture_sampler_follows_weights(tmp_path):
    a = WellDataset(write_well(wave(steps=9), tmp_path / 'a.hdf5'))            # 16 samples
    b = WellDataset(write_well(wave(speeds=(2.0,)), tmp_path / 'b.hdf5'))      # 4 samples
    g = torch.Generator().manual_seed(0)
    for weights, want in ((None, 4 / 20), ([1, 1], 0.5), ([1, 3], 0.75)):
        idx = list(WellMixture([a, b], weights=weights).sampler(6000, generator=g))
        assert abs(np.mean([i >= 16 for i in idx]) - want) < 0.025


def test_mixture_denormalise_uses_each_datasets_stats(tmp_path):
    pa = write_well(wave(), tmp_path / 'a' / 'a.hdf5'); write_stats(compute_stats([pa]), tmp_path / 'a' / 'stats.yaml')
    w = wave(); w.fields = {'u': 3 + 2 * w.fields['u']}
    pb = write_well(w, tmp_path / 'b' / 'b.hdf5'); write_stats(compute_stats([pb]), tmp_path / 'b' / 'stats.yaml')
    raw = WellMixture([WellDataset(pa), WellDataset(pb)])
    mix = WellMixture([WellDataset(pa, normalisation='zscore'), WellDataset(pb, normalisation='zscore')])
    for i in (1, 9):
        s = mix[i]; d = int(s['dataset_index'])
        torch.testing.assert_close(mix.denormalise(s['input_fields'], d), raw[i]['input_fields'], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- generate_dataset, info

class WaveSystem:
    "Stand-in System: random-speed travelling waves, deterministic in `seed`."
    name = 'wave'
    def __init__(self): self._calls = []   # run-time state is private: public attributes are settings
    def simulate(self, n_traj, res=16, steps=5, seed=0, device='cpu', dtype=torch.float32, param_split='id', params=None, progress=True, ic=None):
        self._calls.append(dict(n_traj=n_traj, seed=seed, param_split=param_split, params=params))
        g = torch.Generator().manual_seed(seed)
        speeds = (params or {}).get('speed') or (0.5 + torch.rand(n_traj, generator=g) * (2 if param_split == 'ood' else 1))
        return wave(speeds=tuple(torch.as_tensor(speeds).expand(n_traj).tolist()), nx=res, ny=res, steps=steps)


def test_split_counts_and_seeds():
    assert split_counts(10) == {'train': 8, 'valid': 1, 'test': 1}
    assert split_counts(3) == {'train': 1, 'valid': 1, 'test': 1}
    assert split_counts(2, (1.0, 0.0, 0.0)) == {'train': 2, 'valid': 0, 'test': 0}
    with pytest.raises(ValueError, match='summing to 1'): split_counts(10, (0.5, 0.1, 0.1))
    assert derive_seed(0, 'train', 0) == derive_seed(0, 'train', 0) != derive_seed(0, 'train', 1)


def test_generate_dataset_layout_stats_and_resume(tmp_path):
    sysm = WaveSystem()
    out = generate_dataset(sysm, tmp_path, n_traj=10, res=8, steps=4, seed=7, chunk=4, progress=False)
    root = tmp_path / 'wave'
    assert out['root'] == root and (root / 'stats.yaml').exists()
    assert {s: len(v) for s, v in out['files'].items()} == {'train': 2, 'valid': 1, 'test': 1}
    assert sum(c['n_traj'] for c in sysm._calls) == 10 and len({c['seed'] for c in sysm._calls}) == 4
    for f in (p for v in out['files'].values() for p in v): check_well_file(f)
    st = load_stats(root / 'stats.yaml', 'zscore')
    assert st == compute_stats(out['files']['train'])
    # resume: everything whole -> nothing simulated
    n = len(sysm._calls); again = generate_dataset(sysm, tmp_path, n_traj=10, res=8, steps=4, seed=7, chunk=4, progress=False)
    assert len(sysm._calls) == n and len(again['skipped']) == 4
    # a killed run leaves a missing file, a damaged one a bad file: both are remade identically
    f0, f1 = out['files']['train']
    before = [read_well(f).fields['u'] for f in (f0, f1)]
    f0.unlink(); f1.write_bytes(f1.read_bytes()[:1000])
    generate_dataset(sysm, tmp_path, n_traj=10, res=8, steps=4, seed=7, chunk=4, progress=False)
    assert len(sysm._calls) == n + 2
    for f, b in zip((f0, f1), before): torch.testing.assert_close(read_well(f).fields['u'], b, rtol=0, atol=0)
    # other seed -> other data; the_well-style dataset root is readable by our reader
    ds = WellDataset(root, split='train', n_steps_input=2, n_steps_output=1, normalisation='zscore')
    assert len(ds) == 8 * 2 and ds.stats_path == root / 'stats.yaml'


def test_generate_dataset_ood_goes_to_its_own_folder_and_params_pass_through(tmp_path):
    sysm = WaveSystem()
    out = generate_dataset(sysm, tmp_path, n_traj=3, res=8, steps=3, seed=1, param_split='ood', params={'speed': 1.25}, progress=False)
    assert out['root'] == tmp_path / 'wave_ood' and {c['param_split'] for c in sysm._calls} == {'ood'}
    assert read_well(out['files']['test'][0]).scalars['speed'].tolist() == [1.25]
    assert read_well(out['files']['test'][0]).attrs['request']['param_split'] == 'ood'


def test_info_summarises_files_folders_and_datasets(tmp_path):
    out = generate_dataset(WaveSystem(), tmp_path, n_traj=5, res=8, steps=3, seed=0, progress=False)
    f = info(out['files']['train'][0])
    assert f['kind'] == 'file' and f['n_trajectories'] == 3 and f['channels'] == ['u', 'grad_u_x', 'grad_u_y']
    assert f['boundary_sides'] == {'x': ['PERIODIC', 'PERIODIC'], 'y': ['PERIODIC', 'PERIODIC']}
    d = info(out['root'])
    assert d['kind'] == 'dataset' and set(d['splits']) == {'train', 'valid', 'test'} and 'std_delta' in d['stats']
    assert sum(s['n_trajectories'] for s in d['splits'].values()) == 5
    text = info_text(out['root'])
    assert 'train' in text and 'grad_u (t1)' in text and 'x: PERIODIC' in text
    assert '3 trajectories × 3 steps × 8×8' in info_text(out['files']['train'][0])


def test_generate_dataset_remakes_files_when_the_request_changes_and_refuses_stale_files(tmp_path):
    sysm = WaveSystem()
    generate_dataset(sysm, tmp_path, n_traj=3, res=8, steps=3, seed=0, progress=False)
    n = len(sysm._calls)
    with pytest.raises(ValueError, match="res 8 on disk, 12 asked"):                             # refused, nothing simulated
        generate_dataset(sysm, tmp_path, n_traj=3, res=12, steps=3, seed=0, progress=False)
    assert len(sysm._calls) == n
    out = generate_dataset(sysm, tmp_path, n_traj=3, res=12, steps=3, seed=0, progress=False, overwrite=True)  # new resolution
    assert len(sysm._calls) == n + 3 and out['skipped'] == []
    assert read_well(out['files']['train'][0]).fields['u'].shape[-2:] == (12, 12)
    generate_dataset(sysm, tmp_path, n_traj=10, res=12, steps=3, seed=0, chunk=4, progress=False, overwrite=True)   # more files
    with pytest.raises(ValueError, match='holds files this run would not write'):
        generate_dataset(sysm, tmp_path, n_traj=3, res=12, steps=3, seed=0, progress=False)


class ScaledWave(WaveSystem):
    "WaveSystem with a solver setting: fields times `amplitude`."
    def __init__(self, amplitude=1.0, tag=('a', 1)):
        super().__init__(); self.amplitude, self.tag = amplitude, tag
        self.kernel = torch.ones(2); self.hook = lambda x: x      # a tensor counts (as a list); a function cannot
    def simulate(self, *args, **kw):
        traj = super().simulate(*args, **kw)
        traj.fields = {k: v * self.amplitude for k, v in traj.fields.items()}
        return traj


def test_system_settings_are_the_public_json_able_attributes():
    assert system_settings(ScaledWave(2.0)) == {'amplitude': 2.0, 'kernel': [1.0, 1.0], 'tag': ['a', 1]}
    assert system_settings(WaveSystem()) == {} and system_settings(object()) == {}
    nan = ScaledWave(float('nan')); assert 'amplitude' not in system_settings(nan)   # NaN != NaN: no exact JSON form


def test_generate_dataset_remakes_files_when_the_system_or_its_settings_change(tmp_path):
    "A changed setting or another class under the same name= remakes every file in place, like a changed seed; the same request skips all."
    kw = dict(n_traj=10, res=8, steps=3, seed=0, chunk=4, name='wave', progress=False)
    plain = generate_dataset(WaveSystem(), tmp_path, **kw)
    u = {p: read_well(p).fields['u'] for v in plain['files'].values() for p in v}
    rms_plain = load_stats(plain['stats'])['rms']['u']
    loud = ScaledWave(2.0)
    with pytest.raises(ValueError, match="system 'WaveSystem' on disk, 'ScaledWave' asked"):
        generate_dataset(loud, tmp_path, **kw)
    out = generate_dataset(loud, tmp_path, overwrite=True, **kw)       # another class, same folder name
    assert out['skipped'] == [] and len(loud._calls) == 4
    for p, v in u.items(): torch.testing.assert_close(read_well(p).fields['u'], 2 * v, rtol=0, atol=0)
    assert read_well(p).attrs['request']['system'] == 'ScaledWave'
    assert read_well(p).attrs['request']['settings']['amplitude'] == 2.0
    mtimes = {p: p.stat().st_mtime_ns for p in u}
    again = generate_dataset(loud, tmp_path, **kw)                     # identical rerun: nothing simulated or written
    assert len(again['skipped']) == 4 and len(loud._calls) == 4
    assert {p: p.stat().st_mtime_ns for p in u} == mtimes
    assert len(generate_dataset(ScaledWave(2.0), tmp_path, **kw)['skipped']) == 4   # an equal instance is the same request
    out = generate_dataset(ScaledWave(3.0), tmp_path, overwrite=True, **kw)   # another setting: everything remade
    assert out['skipped'] == []
    for p, v in u.items(): torch.testing.assert_close(read_well(p).fields['u'], 3 * v, rtol=0, atol=0)
    assert load_stats(out['stats'])['rms']['u'] == pytest.approx(3 * rms_plain, rel=1e-5)   # stats.yaml remade too


def test_write_dataset_lays_out_ready_made_trajectories(tmp_path):
    out = write_dataset({'train': [wave(), wave(speeds=(3.0,))], 'valid': wave(speeds=(0.1,))}, tmp_path)
    assert out['root'] == tmp_path / 'wave' and [p.name for p in out['files']['train']] == ['wave_train_0000.hdf5', 'wave_train_0001.hdf5']
    assert load_stats(out['stats'], 'rms') == compute_stats(out['files']['train'])
    assert len(WellDataset(out['root'], split='valid', normalisation='rms')) == 4
    with pytest.raises(ValueError, match=r"split names \['val'\] are not among"): write_dataset({'val': wave()}, tmp_path)
    with pytest.raises(ValueError, match="needs a non-empty 'train' split"): write_dataset({'test': wave()}, tmp_path)


def test_mixture_refuses_different_window_shapes(tmp_path):
    p = write_well(wave(), tmp_path / 'a.hdf5')
    with pytest.raises(ValueError, match=r"differ in \(n_steps_input, n_steps_output\)"):
        WellMixture([WellDataset(p, n_steps_input=1), WellDataset(p, n_steps_input=2)])


def test_denormalise_sample_restores_physical_units(tmp_path):
    p = write_well(wave(constant=True), tmp_path / 'a.hdf5'); write_stats(compute_stats([p]), tmp_path / 'stats.yaml')
    raw, ds = WellDataset(p), WellDataset(p, normalisation='zscore')
    batch = torch.utils.data.default_collate([ds[0], ds[3]])
    back, want = ds.denormalise_sample(batch), torch.utils.data.default_collate([raw[0], raw[3]])
    for k in ('input_fields', 'output_fields', 'constant_fields'):
        torch.testing.assert_close(back[k], want[k], atol=1e-5, rtol=1e-5)


def test_reader_handles_the_wells_optional_layouts(tmp_path):
    "Fields stored without some axes (dim/sample_varying False), per-sample time, 0-d float64 scalars, 2-D masks."
    p = write_well(wave(steps=6), tmp_path / 'a.hdf5')
    rng = np.random.default_rng(0)
    profile, shared = rng.random((6, 16), dtype=np.float32), (rng.random((16, 8)) > 0.5).astype(np.float32)
    with h5py.File(p, 'r+') as f:
        g = f['t0_fields']
        for name, arr, dv, tv in (('profile', profile, [True, False], True), ('shared', shared, [True, True], False)):
            d = g.create_dataset(name, data=arr); d.attrs['dim_varying'] = dv; d.attrs['sample_varying'] = False; d.attrs['time_varying'] = tv
        g.attrs['field_names'] = ['u', 'profile', 'shared']
        t = f['dimensions/time'][:]; del f['dimensions/time']
        d = f['dimensions'].create_dataset('time', data=np.stack([t, 2 * t])); d.attrs['sample_varying'] = True; d.attrs['time_varying'] = True
        d = f['scalars'].create_dataset('gamma', data=np.array(1.4)); d.attrs['sample_varying'] = False; d.attrs['time_varying'] = False
        f['scalars'].attrs['field_names'] = ['speed', 'gamma']
        del f['boundary_conditions/y_periodic']
        b = f['boundary_conditions'].create_group('y_wall')
        for k, v in (('bc_type', 'wall'), ('associated_dims', ['x', 'y']), ('associated_fields', []), ('sample_varying', False), ('time_varying', False)): b.attrs[k] = v
        mask = np.zeros((16, 8), bool); mask[:, 0] = True; b.create_dataset('mask', data=mask)   # wall at y = 0 only
    check_well_file(p)
    ds = WellDataset(p, n_steps_input=2, n_steps_output=1, normalise_time_grid=False)
    assert ds.field_names == ['u', 'profile', 'grad_u_x', 'grad_u_y'] and ds.constant_field_names == ['shared']
    s = ds[len(ds) - 1]                                            # trajectory 1, frames 3, 4 -> 5
    torch.testing.assert_close(s['output_fields'][0, ..., 1], torch.from_numpy(profile[5])[:, None].expand(16, 8))
    torch.testing.assert_close(s['constant_fields'][..., 0], torch.from_numpy(shared))
    torch.testing.assert_close(s['input_time_grid'], 2 * torch.from_numpy(t[3:5]).float())
    assert s['constant_scalars'].dtype == torch.float32 and s['constant_scalars'][1].item() == pytest.approx(1.4)
    assert s['boundary_conditions'].tolist() == [[2, 2], [0, 1]]   # y: wall below, open above
    st = compute_stats([p])
    assert st['std']['profile'] == pytest.approx(float(profile.astype(np.float64).std()), rel=1e-9)
    assert 'y: WALL/OPEN' in info_text(p)


def test_generate_dataset_without_steps_uses_the_systems_default(tmp_path):
    out = generate_dataset(WaveSystem(), tmp_path, n_traj=3, res=8, seed=0, progress=False)
    assert read_well(out['files']['train'][0]).n_steps == 5     # WaveSystem.simulate's default
