"""Headless tests of physnb.viz.widgets: drive the ipywidgets controls, check the plotly FigureWidget (no browser)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
import ipywidgets as widgets
import plotly.graph_objects as go

from physnb.metrics import vrmse
from physnb.viz.widgets import (frames_of, Windows, as_z, heatmap_row, update_panels, symmetric_range,
                                compression_levels, CompressionExplorer, compression_explorer,
                                RolloutScrubber, rollout_scrubber)

torch.set_num_threads(1)


class BlockMean(nn.Module):
    "Stand-in with the Tokeniser interface: one token = the mean of an s×s×t block; counts calls, records the mode."
    def __init__(self, n_fields=2, spatial_levels=(4, 8, 16), temporal_levels=(1, 2, 4)):
        super().__init__()
        self.config = SimpleNamespace(spatial_levels=spatial_levels, temporal_levels=temporal_levels, latent=n_fields)
        self.calls, self.seen = 0, []
    def check_compression(self, shape, compression):
        (T, H, W), (s, t) = shape, compression
        if T % t or H % s or W % s:
            raise ValueError(f"compression={tuple(compression)} needs T divisible by {t} and H, W by {s}; shape={tuple(shape)}")
    def token_count(self, shape, compression):
        self.check_compression(shape, compression)
        (T, H, W), (s, t) = shape, compression
        return (T // t) * (H // s) * (W // s)
    def forward(self, x, fields, compression=(8, 1), channel_mask=None):
        self.calls += 1
        self.seen.append(dict(training=self.training, grad=torch.is_grad_enabled(), fields=list(fields), compression=tuple(compression)))
        (B, T, C, H, W), (s, t) = x.shape, compression
        tokens = x.reshape(B, T // t, t, C, H // s, s, W // s, s).mean((2, 5, 7))
        return tokens.repeat_interleave(t, 1).repeat_interleave(s, 3).repeat_interleave(s, 4)


def smooth_windows(n=3, T=4, C=2, H=32, W=32, seed=0):
    "Random smooth-ish fields (N, T, C, H, W), different per sample, frame and channel."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, C, H // 4, W // 4, generator=g)
    x = torch.nn.functional.interpolate(x.reshape(n * T, C, H // 4, W // 4), size=(H, W), mode='bilinear', align_corners=False)
    return (x.reshape(n, T, C, H, W) + 0.1 * torch.randn(n, T, C, H, W, generator=g)).float()


@pytest.fixture
def explorer():
    return CompressionExplorer(BlockMean(), smooth_windows(), ['u', 'v'])


def z(fig, i): return np.array(fig.data[i].z)


def test_every_control_changes_the_figure(explorer):
    fig = explorer.figure
    for name, value in [('time', 2), ('field', 'v'), ('level', (16, 2)), ('sample', 2)]:
        before, title = [z(fig, i) for i in range(3)], fig.layout.title.text
        explorer.controls[name].value = value
        assert any(not np.allclose(z(fig, i), b) for i, b in enumerate(before)), name
        assert fig.layout.title.text != title, name


def test_sample_time_and_field_change_the_original(explorer):
    fig, ctl, data = explorer.figure, explorer.controls, smooth_windows()
    np.testing.assert_allclose(z(fig, 0), data[0, 0, 0].T.numpy(), rtol=0, atol=1e-6)
    ctl['time'].value = 3
    np.testing.assert_allclose(z(fig, 0), data[0, 3, 0].T.numpy(), rtol=0, atol=1e-6)
    ctl['field'].value = 'v'
    np.testing.assert_allclose(z(fig, 0), data[0, 3, 1].T.numpy(), rtol=0, atol=1e-6)
    ctl['sample'].value = 1
    np.testing.assert_allclose(z(fig, 0), data[1, 3, 1].T.numpy(), rtol=0, atol=1e-6)
    assert 'sample 1 · t = 3 · v' in fig.layout.title.text


def test_a_level_change_changes_token_count_and_reconstruction(explorer):
    fig, ctl = explorer.figure, explorer.controls
    original, recon = z(fig, 0), z(fig, 1)
    assert '256 tokens' in fig.layout.title.text                       # 4 frames × (32/4)² at (4, 1)
    ctl['level'].value = (8, 2)
    assert '32 tokens' in fig.layout.title.text and '256 tokens' not in fig.layout.title.text   # 2 × 4²
    np.testing.assert_array_equal(z(fig, 0), original)                 # the original does not depend on the level
    assert not np.allclose(z(fig, 1), recon)
    assert 'ratio 128:1' in fig.layout.title.text                      # 4·2·32·32 numbers / (32 tokens × latent 2)


def test_panels_show_reconstruction_and_its_error(explorer):
    ctl, fig = explorer.controls, explorer.figure
    ctl['level'].value, ctl['time'].value, ctl['field'].value = (8, 1), 1, 'v'
    x = smooth_windows()[0]
    block = x.reshape(4, 2, 4, 8, 4, 8).mean((3, 5)).repeat_interleave(8, 2).repeat_interleave(8, 3)
    np.testing.assert_allclose(z(fig, 1), block[1, 1].T.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(z(fig, 2), (block[1, 1] - x[1, 1]).T.numpy(), rtol=0, atol=1e-5)
    # VRMSE in the title is physnb.metrics.vrmse of that frame; the window's is the mean over (T, C)
    frame = float(vrmse(block[1, 1][..., None], x[1, 1][..., None])[0])
    whole = float(vrmse(block.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)).mean())
    assert f'VRMSE v(t=1) {frame:.3f}' in fig.layout.title.text
    assert f'whole window {whole:.3f}' in fig.layout.title.text
    # colour scales: original and reconstruction share the field's range over the window; the error map is symmetric
    lay = fig.layout
    assert [d.coloraxis for d in fig.data] == ['coloraxis', 'coloraxis', 'coloraxis2']
    np.testing.assert_allclose((lay.coloraxis.cmin, lay.coloraxis.cmax), (float(x[:, 1].min()), float(x[:, 1].max())), rtol=1e-6)
    assert lay.coloraxis2.cmin == -lay.coloraxis2.cmax == -float((block[:, 1] - x[:, 1]).abs().max())


def test_revisits_are_served_from_the_cache(explorer):
    model, ctl = explorer.tokeniser, explorer.controls
    assert model.calls == 1
    for t in range(4): ctl['time'].value = t                            # scrubbing time: no model call
    ctl['field'].value = 'v'; ctl['field'].value = 'u'                 # nor switching field
    assert model.calls == 1
    ctl['level'].value = (16, 4); ctl['sample'].value = 1              # two new (sample, level) pairs
    assert model.calls == 3
    ctl['level'].value = (4, 1); ctl['sample'].value = 0; ctl['level'].value = (16, 4); ctl['sample'].value = 1
    assert model.calls == 4                                            # only (1, (4, 1)) was new
    assert explorer.model_calls == model.calls


def test_refresh_recomputes_after_the_weights_change():
    class Scaled(BlockMean):
        gain = 1.0
        def forward(self, x, *a, **k): return self.gain * super().forward(x, *a, **k)
    model = Scaled()
    ex = CompressionExplorer(model, smooth_windows(), ['u', 'v'])
    recon = z(ex.figure, 1)
    model.gain = 2.0
    ex.controls['time'].value = 1; ex.controls['time'].value = 0
    np.testing.assert_array_equal(z(ex.figure, 1), recon)                          # still the cached reconstruction
    ex.refresh()
    assert model.calls == 2
    np.testing.assert_allclose(z(ex.figure, 1), 2 * recon, rtol=1e-6)


def test_the_cache_keeps_the_most_recently_used():
    model = BlockMean()
    ex = CompressionExplorer(model, smooth_windows(), ['u', 'v'], max_cached=2)    # (0, (4, 1)) cached
    ex.controls['level'].value = (8, 1)                                            # (0, (8, 1)) cached
    ex.controls['level'].value = (4, 1)                                            # a hit; (8, 1) is now the oldest
    ex.controls['level'].value = (16, 1)                                           # new: drops (0, (8, 1))
    assert model.calls == 3 and list(ex._cache) == [(0, (4, 1)), (0, (16, 1))]
    ex.controls['level'].value = (4, 1)
    assert model.calls == 3
    ex.controls['level'].value = (8, 1)
    assert model.calls == 4


def test_model_runs_in_eval_mode_without_grad_and_mode_is_restored():
    model = BlockMean(); model.train()
    ex = CompressionExplorer(model, smooth_windows(), ['u', 'v'], levels=[(8, 1)])
    assert model.seen == [dict(training=False, grad=False, fields=['u', 'v'], compression=(8, 1))]
    assert model.training and torch.is_grad_enabled()
    ex.controls['sample'].value = 2
    assert model.training and len(model.seen) == 2


def test_block_mean_error_grows_with_compression(explorer):
    # block means are orthogonal projections onto nested subspaces, so coarser blocks can only lose more
    spatial = [float(explorer.reconstruction(0, (s, 1))[1].mean()) for s in (4, 8, 16)]
    temporal = [float(explorer.reconstruction(0, (4, t))[1].mean()) for t in (1, 2, 4)]
    assert spatial[0] < spatial[1] < spatial[2] and temporal[0] < temporal[1] < temporal[2]


def test_levels_that_do_not_fit_are_left_out():
    model = BlockMean()
    ex = CompressionExplorer(model, smooth_windows(T=2, H=24, W=24), ['u', 'v'])
    assert ex.levels == [(4, 1), (4, 2), (8, 1), (8, 2)]               # 24 % 16 != 0, 2 frames % 4 != 0
    assert [v for _, v in ex.controls['level'].options] == ex.levels
    assert ex.controls['level'].options[0][0] == '4×4 space, ×1 time (72 tokens)'
    assert compression_levels(model, (3, 32, 32)) == [(4, 1), (8, 1), (16, 1)]
    assert compression_levels(model, (4, 32, 32), levels=[(16, 4), (4, 3), '8x2']) == [(16, 4), (8, 2)]


def test_no_level_that_fits_is_a_clear_error():
    with pytest.raises(ValueError, match=r"none of the compression levels .* fits windows of shape \(T, H, W\) = \(3, 30, 30\)"):
        CompressionExplorer(BlockMean(), smooth_windows(T=3, H=30, W=30)[..., :30, :30], ['u', 'v'])


@pytest.mark.parametrize('kwargs, message', [
    (dict(samples=torch.zeros(2, 2, 8, 8)), r'\(N, T, C, H, W\)'),
    (dict(samples=3), 'Dataset of windows'),
    (dict(samples=[]), 'samples is empty'),
    (dict(samples=[{'output_fields': torch.zeros(2, 8, 8, 2)}]), "'input_fields'"),
    (dict(field_names=['u']), '2 channels but field_names has 1'),
    (dict(field_names=None), 'field_names=None needs samples.field_names'),
    (dict(levels=[(8,)]), r'not a \(spatial, temporal\) pair'),
    (dict(levels=['8y1']), r'not a \(spatial, temporal\) pair'),
    (dict(device='tpu'), "device='tpu' is not one of"),
])
def test_bad_inputs_give_clear_errors(kwargs, message):
    args = dict(tokeniser=BlockMean(), samples=smooth_windows(), field_names=['u', 'v'])
    with pytest.raises((ValueError, TypeError), match=message):
        CompressionExplorer(**{**args, **kwargs})


def test_windows_of_another_shape_are_named():
    ex = CompressionExplorer(BlockMean(), [smooth_windows(n=1)[0], smooth_windows(n=1, H=16, W=16)[0]], ['u', 'v'])
    with pytest.raises(ValueError, match=r'sample 1 has shape \(4, 2, 16, 16\) but sample 0 has \(T, C, H, W\) = \(4, 2, 32, 32\)'):
        ex.reconstruction(1, (4, 1))


def test_windows_go_to_the_tokeniser_device():
    model = BlockMean()
    assert CompressionExplorer(model, smooth_windows(), ['u', 'v']).device == torch.device('cpu')   # no parameters: cpu
    model.weight = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    assert CompressionExplorer(model, smooth_windows(), ['u', 'v'], device='cpu').device == torch.device('cpu')
    if torch.cuda.is_available():
        model.cuda()
        ex = CompressionExplorer(model, smooth_windows(), ['u', 'v'])
        assert ex.device.type == 'cuda' and ex.reconstruction(0, (4, 1))[0].device.type == 'cpu'


def test_a_wrong_reconstruction_shape_is_named():
    class Cropping(BlockMean):
        def forward(self, x, fields, compression=(8, 1), channel_mask=None): return x[..., :-1]
    with pytest.raises(ValueError, match=r'returned shape \(4, 2, 32, 31\) for a window of shape \(4, 2, 32, 32\)'):
        CompressionExplorer(Cropping(), smooth_windows(), ['u', 'v'])


def test_well_samples_are_converted_from_channels_last(tmp_path):
    from physnb.sim.systems import SYSTEMS
    from physnb.data.generate import generate_dataset
    from physnb.data.datasets import WellDataset
    gs = generate_dataset(SYSTEMS['gray_scott'], tmp_path, n_traj=2, res=16, steps=4, seed=0, progress=False, fractions=(1, 0, 0))
    ds = WellDataset(gs['root'], split='train', n_steps_input=4, n_steps_output=0)
    w = compression_explorer(BlockMean(), ds, levels=[(4, 1), (8, 2), (16, 4)])    # fields from ds.field_names
    ex = w.explorer
    assert isinstance(w, widgets.VBox) and ex.field_names == ['A', 'B'] and len(ex.windows) == len(ds)
    assert ex.levels == [(4, 1), (8, 2), (16, 4)]
    ex.controls['field'].value = 'B'; ex.controls['time'].value = 2
    np.testing.assert_array_equal(z(ex.figure, 0), ds[0]['input_fields'][2, :, :, 1].T.numpy())
    assert ex.controls['sample'].max == len(ds) - 1


def test_windows_and_frames():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 4, 5, 3)            # (T, H, W, C)
    torch.testing.assert_close(frames_of({'input_fields': x}), x.permute(0, 3, 1, 2).float())
    assert frames_of(np.zeros((1, 2, 3, 4))).dtype == torch.float32
    ws = Windows(torch.zeros(3, 2, 1, 4, 4))
    assert len(ws) == 3 and ws[0] is ws[0]
    with pytest.raises(IndexError, match='out of range'): ws[3]


def test_heatmap_row_layout_and_orientation():
    fig = heatmap_row(['a', 'b', 'c'], scales=(0, 0, 1), curve='metric', lines=('m', 'now'))
    assert isinstance(fig, go.FigureWidget) and [d.type for d in fig.data] == ['heatmap'] * 3 + ['scatter'] * 2
    assert fig.data[3].xaxis == 'x4' and fig.layout.yaxis.scaleanchor == 'x' and fig.layout.yaxis3.scaleanchor == 'x3'
    field = torch.arange(12.).reshape(4, 3)                                       # (Nx, Ny), f[i, j] = 3i + j
    update_panels(fig, images={2: field}, ranges={1: symmetric_range(field - 20)}, traces={3: dict(x=[0, 1], y=[2, 3])}, title='T')
    assert np.array(fig.data[2].z).shape == (3, 4) and fig.data[2].z[1][2] == float(field[2, 1])   # x to the right, y up
    assert (fig.layout.coloraxis2.cmin, fig.layout.coloraxis2.cmax) == (-20.0, 20.0)
    assert fig.data[3].y == (2, 3) and fig.layout.title.text == 'T'
    assert symmetric_range(torch.zeros(3)) == (-1e-12, 1e-12)
    with pytest.raises(ValueError, match='lines need a curve panel'): heatmap_row(['a'], lines=('m',))


def test_large_fields_are_block_averaged_for_drawing_only():
    x = smooth_windows(n=1, T=1, C=1, H=256, W=192)
    ex = CompressionExplorer(BlockMean(n_fields=1), x, ['u'], levels=[(4, 1)], max_size=64)
    assert np.array(ex.figure.data[0].z).shape == (48, 64)                          # (W/4, H/4): y rows, x columns
    np.testing.assert_allclose(z(ex.figure, 0), x[0, 0, 0].reshape(64, 4, 48, 4).mean((1, 3)).T.numpy(), atol=1e-5)
    d = ex.figure.data[0]
    assert (d.dx, d.dy, d.x0, d.y0) == (4, 4, 1.5, 1.5)                             # axes still count grid points
    v = float(vrmse(ex.reconstruction(0, (4, 1))[0].permute(0, 2, 3, 1), x[0].permute(0, 2, 3, 1))[0, 0])
    assert f'VRMSE u(t=0) {v:.3f}' in ex.figure.layout.title.text                   # the metric uses the full field
    assert np.array(as_z(torch.zeros(130, 10), max_size=128)).shape == (5, 65)


def test_figure_stays_small(explorer):
    # 32² float32 fields as lists: three panels fit in well under 100 kB of JSON
    assert len(json.dumps(explorer.figure.to_plotly_json())) < 100_000
    assert all(isinstance(v, float) for v in explorer.figure.data[0].z[0])


def test_displaying_the_widget_refreshes_the_figure_state_voila_draws(explorer):
    # Voilà and a reloaded page draw a FigureWidget from its synced `_widget_data`, which plotly refreshes only when
    # the figure itself is displayed; ours sits in a VBox, so the box refreshes it
    explorer.controls['time'].value = 3
    stale = np.array(explorer.figure._widget_data[0]['z'])
    assert not np.allclose(stale, z(explorer.figure, 0))
    bundle = explorer.widget._repr_mimebundle_()
    assert bundle['application/vnd.jupyter.widget-view+json']['model_id'] == explorer.widget.model_id
    np.testing.assert_array_equal(np.array(explorer.figure._widget_data[0]['z']), z(explorer.figure, 0))
    assert explorer.figure._widget_layout['title']['text'] == explorer.figure.layout.title.text


def test_the_physnb_tokeniser_works_in_the_explorer():
    from physnb.models.tokeniser import Tokeniser, TokeniserConfig
    torch.manual_seed(0)
    tok = Tokeniser(TokeniserConfig(field_names=['v', 'u', 'w'], width=16, latent=4))
    x = smooth_windows(n=2, T=2, H=24, W=24)
    ex = CompressionExplorer(tok, x, ['u', 'v'])                                  # a subset of its fields, another order
    assert ex.levels == tok.allowed_compressions((2, 24, 24))
    for level in ex.levels:
        row = next(r for r in tok.compression_table((2, 2, 24, 24)) if (r['spatial'], r['temporal']) == tuple(level))
        assert ex.token_count(level) == row['tokens'] and ex.compression_ratio(level) == pytest.approx(row['ratio'])
    ex.controls['level'].value = ex.levels[-1]
    with torch.no_grad(): expected = tok.eval()(x[:1], ['u', 'v'], compression=ex.levels[-1])[0]
    np.testing.assert_allclose(z(ex.figure, 1), expected[0, 0].T.numpy(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="'q'.* not known"):
        CompressionExplorer(tok, x, ['u', 'q'])


def test_rollout_scrubber_persistence_error_starts_at_zero_and_tracks_the_slider():
    truth = smooth_windows(n=1, T=6)[0]
    persistence = truth[:1].expand_as(truth)
    w = rollout_scrubber(truth, persistence, ['u', 'v'])
    sc, fig = w.explorer, w.explorer.figure
    assert sc.vrmse.shape == (6, 2) and float(sc.vrmse[0].abs().max()) == 0.0 and bool((sc.vrmse[1:] > 0).all())
    sc.controls['time'].value = 4
    np.testing.assert_allclose(z(fig, 0), truth[4, 0].T.numpy(), atol=1e-6)
    np.testing.assert_allclose(z(fig, 1), truth[0, 0].T.numpy(), atol=1e-6)
    np.testing.assert_allclose(z(fig, 2), (truth[0, 0] - truth[4, 0]).T.numpy(), atol=1e-6)
    assert fig.data[4].x == (4,) and fig.data[4].y[0] == pytest.approx(float(sc.vrmse[4, 0]))
    assert 'step 4 of 5' in fig.layout.title.text
    sc.controls['field'].value = 'v'
    np.testing.assert_allclose(fig.data[3].y, sc.vrmse[:, 1].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match='must match'): RolloutScrubber(truth, persistence[:3], ['u', 'v'])
    with pytest.raises(ValueError, match='2 channels but field_names has 3'): RolloutScrubber(truth, persistence, ['u', 'v', 'w'])
    well = RolloutScrubber(truth.permute(0, 2, 3, 1), persistence.permute(0, 2, 3, 1), ['u', 'v'], channels_last=True)
    torch.testing.assert_close(well.vrmse, sc.vrmse)
    np.testing.assert_array_equal(z(well.figure, 0), z(RolloutScrubber(truth, persistence, ['u', 'v']).figure, 0))


def test_every_figure_carries_a_small_loader_and_shares_one_plotly_script(explorer):
    # plotly's FigureWidget syncs its ~5 MB script per figure; after a page reload five of them failed to initialise
    # in anywidget's 2 s (issue 15). The kit's figures sync a 1 kB loader and share one PlotlyScript per kernel.
    import re, plotly
    from pathlib import Path
    from physnb.viz.widgets import LightFigureWidget, PlotlyScript, plotly_script
    from physnb.viz.cramer_wold import projection_explorer, x_distribution
    truth = torch.randn(4, 2, 8, 8)
    figures = [explorer.figure, rollout_scrubber(truth, truth, ['u', 'v']).explorer.figure, projection_explorer(x_distribution(50)).figure]
    script = plotly_script()
    for fig in figures:
        assert isinstance(fig, LightFigureWidget) and fig._script is script
        state = fig.get_state()
        assert len(state['_esm']) < 2_000 and state['_script'] == f'IPY_MODEL_{script.model_id}'
        assert len(json.dumps(state, default=str)) < 300_000
    bundle = (Path(plotly.__file__).parent / 'package_data' / 'widgetbundle.js').read_text()
    assert script.code == bundle and re.search(r'export\s*\{[^}]*\bas default\s*\}', bundle)   # the loader calls its default export
    script.close()                                  # Widget.close_all() or a user closing it: the next figure makes a new one
    fresh = heatmap_row(['a'])
    assert isinstance(fresh._script, PlotlyScript) and fresh._script is not script and fresh._script.comm is not None
