"""Cross-checks against the real `the_well` package (1.2.0): it must load what we write, and we must read what it writes.

the_well is a test oracle only; physnb itself never imports it."""
import math, warnings

import numpy as np
import pytest
import torch

pytest.importorskip('the_well')
from the_well.data import WellDataset as TheWellDataset                       # noqa: E402
from the_well.data.normalization import RMSNormalization, ZScoreNormalization  # noqa: E402
from the_well.utils.dummy_data import write_dummy_data                       # noqa: E402

from physnb.core import Trajectories                                           # noqa: E402
from physnb.data.well import BC_CODES, WellFormatError, check_well_file, read_well, write_well
from physnb.data.datasets import WellDataset
from physnb.data.stats import compute_stats, write_stats
from physnb.data.generate import generate_dataset
from physnb.data.info import info

pytestmark = pytest.mark.oracle
torch.set_num_threads(1)
warnings.filterwarnings('ignore', category=UserWarning)


def rich(speeds=(0.5, 1.0, 1.5), nx=16, ny=12, steps=7, bcs=('periodic', 'wall')):
    "A travelling wave with scalar, vector and tensor fields, a constant field and a per-trajectory parameter."
    g = torch.Generator().manual_seed(0)
    c = torch.tensor(speeds)[:, None, None, None]
    x = torch.arange(nx) * 2 * math.pi / nx; y = torch.linspace(0, 1, ny)
    t = 0.1 + torch.arange(steps) * 0.25                        # not starting at 0: relative time grids matter
    X, Y = torch.meshgrid(x, y, indexing='ij'); ph = X - c * t[None, :, None, None]
    u = torch.sin(ph) * (1 + Y)
    B = len(speeds)
    return Trajectories(
        name='rich_wave', time=t, coords={'x': x, 'y': y},
        fields={'u': u, 'velocity': torch.stack([torch.cos(ph), Y.expand_as(ph)], -1),
                'stress': torch.randn(B, steps, nx, ny, 2, 2, generator=g)},
        constant_fields={'density': 1 + torch.rand(B, nx, ny, generator=g)},
        scalars={'speed': torch.tensor(speeds), 'viscosity': torch.tensor([1e-3, 2e-3, 5e-3][:B])},
        bcs=dict(zip('xy', bcs)), attrs={'system': 'rich_wave'})


@pytest.fixture
def dataset_root(tmp_path):
    "ROOT/NAME/data/{train,valid,test}/*.hdf5 + ROOT/NAME/stats.yaml, as generate_dataset lays it out."
    name = tmp_path / 'rich_wave'
    trajs = {'train': [rich(), rich(speeds=(2.0, 0.25, 0.75))], 'valid': [rich(speeds=(1.2,))], 'test': [rich(speeds=(0.9,))]}
    for split, ts in trajs.items():
        for i, t in enumerate(ts): write_well(t, name / 'data' / split / f'rich_wave_{split}_{i:04d}.hdf5')
    write_stats(compute_stats(sorted((name / 'data' / 'train').glob('*.hdf5'))), name / 'stats.yaml')
    return name, trajs


def _expected_channels(t: Trajectories, b, frames):
    "What we wrote, flattened the_well's way: t0, then t1 (x, y), then t2 (xx, xy, yx, yy)."
    u = t.fields['u'][b, frames][..., None]
    v = t.fields['velocity'][b, frames]
    s = t.fields['stress'][b, frames].flatten(-2)
    return torch.cat([u, v, s], -1)


def test_the_well_loads_our_files_with_the_shapes_and_values_we_wrote(dataset_root):
    root, trajs = dataset_root
    tw = TheWellDataset(path=str(root / 'data' / 'train'), n_steps_input=3, n_steps_output=2)
    assert len(tw) == 6 * (7 - 5 + 1)
    md = tw.metadata
    assert md.dataset_name == 'rich_wave' and md.spatial_resolution == (16, 12)
    assert md.field_names == {0: ['u'], 1: ['velocity_x', 'velocity_y'], 2: ['stress_xx', 'stress_xy', 'stress_yx', 'stress_yy']}
    assert md.constant_field_names == {0: ['density'], 1: [], 2: []}
    assert md.constant_scalar_names == ['speed', 'viscosity'] and md.scalar_names == []
    assert sorted(md.boundary_condition_types) == ['PERIODIC', 'WALL']
    # sample 8: file 0 (sorted), trajectory 8 // 3 = 2, window start 8 % 3 = 2
    s = tw[8]; t = trajs['train'][0]
    assert s['input_fields'].shape == (3, 16, 12, 7) and s['output_fields'].shape == (2, 16, 12, 7)
    torch.testing.assert_close(s['input_fields'], _expected_channels(t, 2, slice(2, 5)), rtol=0, atol=0)
    torch.testing.assert_close(s['output_fields'], _expected_channels(t, 2, slice(5, 7)), rtol=0, atol=0)
    torch.testing.assert_close(s['constant_fields'][..., 0], t.constant_fields['density'][2], rtol=0, atol=0)
    torch.testing.assert_close(s['constant_scalars'], torch.tensor([1.5, 5e-3]))   # this trajectory's parameters
    assert s['boundary_conditions'].tolist() == [[2, 2], [0, 0]]                   # x periodic, y wall
    torch.testing.assert_close(s['space_grid'][..., 0], t.coords['x'][:, None].expand(16, 12))
    torch.testing.assert_close(s['input_time_grid'], torch.tensor([0.0, 0.25, 0.5]))
    torch.testing.assert_close(s['output_time_grid'], torch.tensor([0.75, 1.0]))
    # second file, other splits
    torch.testing.assert_close(tw[len(tw) - 1]['output_fields'], _expected_channels(trajs['train'][1], 2, slice(5, 7)), rtol=0, atol=0)
    tv = TheWellDataset(path=str(root), well_split_name='valid', n_steps_input=1, n_steps_output=1)
    torch.testing.assert_close(tv[3]['output_fields'][0], _expected_channels(trajs['valid'][0], 0, 4), rtol=0, atol=0)


def test_our_reader_returns_what_the_well_returns(dataset_root):
    root, _ = dataset_root
    for kw_tw, kw_ours in (
        (dict(n_steps_input=3, n_steps_output=2), dict(n_steps_input=3, n_steps_output=2)),
        (dict(n_steps_input=2, n_steps_output=1, min_dt_stride=2, max_dt_stride=2), dict(n_steps_input=2, n_steps_output=1, dt_stride=2)),
        (dict(n_steps_input=2, full_trajectory_mode=True), dict(n_steps_input=2, full_trajectory=True)),
    ):
        tw = TheWellDataset(path=str(root), well_split_name='train', **kw_tw)
        ours = WellDataset(root, split='train', **kw_ours)
        assert len(tw) == len(ours) and ours.field_names == [n for v in tw.metadata.field_names.values() for n in v]
        for i in (0, len(ours) // 2, len(ours) - 1):
            a, b = tw[i], ours[i]
            assert set(a) == set(b)
            for k in a: torch.testing.assert_close(b[k], a[k].to(b[k].dtype), rtol=0, atol=0, msg=f'{kw_ours} sample {i} key {k}')


@pytest.mark.parametrize('ours_kind, theirs', [('zscore', ZScoreNormalization), ('rms', RMSNormalization)])
def test_the_well_normalises_with_our_stats_exactly_like_we_do(dataset_root, ours_kind, theirs):
    root, _ = dataset_root
    tw = TheWellDataset(path=str(root), well_split_name='train', n_steps_input=2, n_steps_output=1,
                        use_normalization=True, normalization_type=theirs)
    ours = WellDataset(root, split='train', n_steps_input=2, n_steps_output=1, normalisation=ours_kind)
    raw = WellDataset(root, split='train', n_steps_input=2, n_steps_output=1)
    for i in (0, 11, len(ours) - 1):
        a, b = tw[i], ours[i]
        for k in ('input_fields', 'output_fields', 'constant_fields'):
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
        # and the flattened denormalisation of the_well agrees with ours: metrics on physical values
        torch.testing.assert_close(tw.norm.denormalize_flattened(a['output_fields'], 'variable'), raw[i]['output_fields'], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.denormalise(b['output_fields']), raw[i]['output_fields'], atol=1e-5, rtol=1e-5)


def test_the_well_reads_steady_single_step_files(tmp_path):
    x = torch.linspace(0, 1, 8)
    g = torch.Generator().manual_seed(1)
    steady = Trajectories(name='poisson', fields={'source': torch.randn(4, 1, 8, 8, generator=g), 'solution': torch.randn(4, 1, 8, 8, generator=g)},
                          time=torch.zeros(1), coords={'x': x, 'y': x}, scalars={'kappa': torch.arange(4.0)},
                          bcs={'x': 'wall', 'y': 'wall'})
    write_well(steady, tmp_path / 'poisson' / 'data' / 'train' / 'a.hdf5')
    write_stats(compute_stats([tmp_path / 'poisson' / 'data' / 'train' / 'a.hdf5']), tmp_path / 'poisson' / 'stats.yaml')
    tw = TheWellDataset(path=str(tmp_path / 'poisson'), well_split_name='train', n_steps_input=1, n_steps_output=0,
                        use_normalization=True, normalization_type=ZScoreNormalization)
    ours = WellDataset(tmp_path / 'poisson', split='train', n_steps_input=1, n_steps_output=0, normalisation='zscore')
    assert len(tw) == len(ours) == 4
    a, b = tw[3], ours[3]
    assert set(a) == set(b) and 'output_fields' not in a
    torch.testing.assert_close(b['input_fields'], a['input_fields'], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.denormalise(b['input_fields'])[0, ..., 1], steady.fields['solution'][3, 0], atol=1e-5, rtol=1e-5)
    assert float(a['constant_scalars']) == float(b['constant_scalars']) == 3.0
    assert (a['boundary_conditions'] == BC_CODES['WALL']).all() and (b['boundary_conditions'] == BC_CODES['WALL']).all()


def test_the_well_loads_generate_dataset_output(tmp_path):
    class Waves:
        name = 'waves'
        def simulate(self, n_traj, res=16, steps=5, seed=0, device='cpu', dtype=torch.float32, param_split='id', params=None, progress=True):
            g = torch.Generator().manual_seed(seed)
            return rich(speeds=tuple((0.5 + torch.rand(n_traj, generator=g)).tolist()), nx=res, ny=res, steps=steps, bcs=('periodic', 'periodic'))
    # rich() has 3 viscosities at most: keep files at <= 3 trajectories
    out = generate_dataset(Waves(), tmp_path, n_traj=8, res=8, steps=5, seed=2, chunk=3, progress=False)
    for split in ('train', 'valid', 'test'):
        tw = TheWellDataset(path=str(out['root']), well_split_name=split, n_steps_input=2, n_steps_output=1,
                            use_normalization=True, normalization_type=ZScoreNormalization)
        ours = WellDataset(out['root'], split=split, n_steps_input=2, n_steps_output=1, normalisation='zscore')
        assert len(tw) == len(ours) > 0
        torch.testing.assert_close(ours[len(ours) - 1]['output_fields'], tw[len(tw) - 1]['output_fields'], atol=1e-5, rtol=1e-5)


@pytest.fixture
def dummy_dir(tmp_path):
    d = tmp_path / 'dummy' / 'data' / 'train'; d.mkdir(parents=True)
    write_dummy_data(str(d / 'data.hdf5'))
    return d


def test_our_reader_on_the_wells_dummy_file_quirks_included(dummy_dir):
    """the_well's own fixture: float64 scalars (0-d and time-varying), `associated_dims` as a str, no
    `time_varying` on the coordinates, and all-False BC masks (so both loaders report OPEN, not PERIODIC)."""
    tw = TheWellDataset(path=str(dummy_dir), n_steps_input=4, n_steps_output=1)
    ours = WellDataset(dummy_dir, n_steps_input=4, n_steps_output=1)
    assert len(tw) == len(ours) == 12
    assert ours.field_names == ['field_x', 'field_y'] and ours.constant_field_names == ['constant_field']
    assert ours.constant_scalar_names == ['a', 'b'] and ours.scalar_names == ['time_varying_scalar']
    for i in (0, 5, 11):
        a, b = tw[i], ours[i]
        assert set(a) == set(b)
        for k in a:
            assert b[k].shape == a[k].shape, k
            torch.testing.assert_close(b[k], a[k].to(b[k].dtype), rtol=1e-7, atol=0, msg=k)
    s = ours[0]
    assert s['constant_scalars'].dtype == torch.float32 and s['constant_scalars'].tolist() == [0.25, 0.75]
    assert (s['boundary_conditions'] == BC_CODES['OPEN']).all()
    assert info(dummy_dir / 'data.hdf5')['boundary_sides']['x'] == ['OPEN', 'OPEN']
    t = read_well(dummy_dir / 'data.hdf5'); assert t.fields['field'].shape == (2, 10, 32, 32, 2)
    # our strict checker names what The Well's own formatting checker also rejects
    with pytest.raises(WellFormatError, match=r"data.hdf5: dimensions/x: attribute 'time_varying' missing"):
        check_well_file(dummy_dir / 'data.hdf5')
    # no stats.yaml in the fixture: asking for normalisation is an error, not a silent skip
    with pytest.raises(FileNotFoundError, match='needs a stats.yaml'):
        WellDataset(dummy_dir, normalisation='zscore')


def test_the_wells_restriction_bug_is_not_ours(dataset_root):
    "the_well 1.2.0 (#72) restricts to trajectory-0-based indices; ours picks distinct trajectories across files."
    root, _ = dataset_root
    ours = WellDataset(root, split='train', n_trajectories=3, seed=0)
    assert len(set(ours.trajectories)) == 3
    params = {tuple(ours[i]['constant_scalars'].tolist()) for i in range(len(ours))}
    assert len(params) == 3


def _registered_systems() -> dict:
    "Every System in the kit's one registry; a solver module that fails to import fails the collection, loudly."
    from physnb.sim.systems import SYSTEMS
    return dict(SYSTEMS)


def test_the_solver_modules_register_systems():
    assert {'gray_scott', 'ns2d', 'shallow_water', 'acoustics'} <= set(_registered_systems())


@pytest.mark.parametrize('name', sorted(_registered_systems()))
def test_every_registered_system_round_trips_through_the_well(tmp_path, name, monkeypatch):
    "generate_dataset on each real solver at toy size: our checker passes and the_well's loader agrees with ours."
    systems = _registered_systems()
    monkeypatch.setenv('PHYSNB_PROGRESS', '0')
    out = generate_dataset(systems[name], tmp_path, n_traj=3, res=16, steps=3, seed=0, progress=False)
    for f in (p for v in out['files'].values() for p in v): check_well_file(f)
    n_out = 1 if check_well_file(out['files']['train'][0]).n_steps > 1 else 0   # steady systems have T = 1
    tw = TheWellDataset(path=str(out['root']), well_split_name='train', n_steps_input=1, n_steps_output=n_out,
                        use_normalization=True, normalization_type=ZScoreNormalization)
    ours = WellDataset(out['root'], split='train', n_steps_input=1, n_steps_output=n_out, normalisation='zscore')
    assert len(tw) == len(ours) > 0
    for i in (0, len(ours) - 1):
        a, b = tw[i], ours[i]
        assert set(a) == set(b)
        for k in a: torch.testing.assert_close(b[k], a[k].to(b[k].dtype), atol=1e-5, rtol=1e-5, msg=f'{name} {k}')
