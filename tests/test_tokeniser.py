"""Facts about physnb.models.tokeniser that the notebook does not sweep: causality over random configs, every level at
several (non-square) resolutions, error messages, dtypes, checkpoints, determinism, and the stage geometry against
an independent patchify oracle."""
import random

import pytest
import torch
import torch.nn.functional as F

from physnb.core import load_checkpoint, save_checkpoint
from physnb.models.tokeniser import (Compression, DownStage, FrameNorm, SPATIAL_STAGE_STRIDES,
                                     TEMPORAL_STAGE_STRIDES, Tokeniser, TokeniserConfig, UpStage,
                                     as_compression, crop_stage, dependency_matrix, load_tokeniser, overlaps,
                                     pad_stage, parse_levels, save_tokeniser)

FIELDS = ['A', 'B', 'vorticity', 'velocity_x', 'velocity_y']


def small(**kw):
    torch.manual_seed(kw.pop('seed', 0))
    return Tokeniser(TokeniserConfig(field_names=kw.pop('fields', FIELDS), **{'width': 16, 'latent': 4, **kw}))


def random_config(rng: random.Random) -> TokeniserConfig:
    "A random valid config: kernels, levels, norm and padding drawn at random."
    k1, k2 = rng.choice([4, 6, 8]), rng.choice([2, 3, 4])
    kt1, kt2 = rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4])
    spatial = [s for s, (a, b) in SPATIAL_STAGE_STRIDES.items() if a <= k1 and b <= k2 and s <= 16]
    temporal = [t for t, (a, b) in TEMPORAL_STAGE_STRIDES.items() if a <= kt1 and b <= kt2]
    return TokeniserConfig(field_names=FIELDS, width=8, latent=3, groups=rng.choice([1, 2, 4]),
                           spatial_levels=tuple(rng.sample(spatial, k=min(2, len(spatial)))),
                           temporal_levels=tuple(temporal), spatial_kernels=(k1, k2), temporal_kernels=(kt1, kt2),
                           norm=rng.choice(['group', 'rms']), padding_mode=rng.choice(['circular', 'zeros', 'replicate']))


@pytest.mark.parametrize('seed', range(6))
def test_tokens_ignore_the_future(seed):
    "Over random configs and every level: frames >= (j+1)*s never change tokens 0..j."
    rng = random.Random(seed)
    config = random_config(rng)
    torch.manual_seed(seed)
    tok = Tokeniser(config).double()
    T, H, W = 8, 16, 32
    x = torch.randn(2, T, 2, H, W, dtype=torch.float64)
    with torch.no_grad():
        for comp in tok.allowed_compressions((T, H, W)):
            s = comp.temporal
            tokens = tok.encode(x, ['B', 'A'], comp)
            for j in range(T // s - 1):
                future = x.clone()
                future[:, (j + 1) * s:] += 1e3 * torch.randn_like(future[:, (j + 1) * s:])
                changed = tok.encode(future, ['B', 'A'], comp)
                torch.testing.assert_close(changed[:, :j + 1], tokens[:, :j + 1], rtol=0, atol=1e-12, msg=f'{config} {comp} j={j}')
                assert (changed[:, j + 1:] - tokens[:, j + 1:]).abs().max() > 0   # ... while later tokens do change


@pytest.mark.parametrize('seed', range(3))
def test_reconstruction_ignores_later_tokens(seed):
    "Decoder causality: frame t depends on tokens 0..floor(t/s) only; autoencoder: on frames up to the end of its block."
    rng = random.Random(100 + seed)
    torch.manual_seed(seed)
    tok = Tokeniser(random_config(rng)).double()
    x = torch.randn(1, 8, 1, 16, 16, dtype=torch.float64)
    for comp in tok.allowed_compressions((8, 16, 16)):
        s = comp.temporal
        m = dependency_matrix(lambda v: tok(v, ['A'], comp), x)           # (out frame, in frame)
        t_out, t_in = torch.meshgrid(torch.arange(8), torch.arange(8), indexing='ij')
        assert (m[t_in > (t_out // s + 1) * s - 1] == 0).all(), comp
        tokens = tok.encode(x, ['A'], comp).detach()
        m = dependency_matrix(lambda v: tok.decode(v, ['A'], comp), tokens)   # (out frame, token step)
        t_out, j = torch.meshgrid(torch.arange(8), torch.arange(8 // s), indexing='ij')
        assert (m[j > t_out // s] == 0).all(), comp
        assert (m[j == t_out // s] > 0).all(), comp


@pytest.mark.parametrize('shape', [(8, 32, 32), (4, 48, 80), (8, 64, 16), (2, 16, 96)])
def test_every_allowed_level_round_trips_shapes(shape):
    tok = small(spatial_levels=(4, 8, 16), temporal_levels=(1, 2, 4))
    T, H, W = shape
    x = torch.randn(1, T, 3, H, W)
    fields = ['velocity_y', 'A', 'vorticity']
    allowed = tok.allowed_compressions(shape)
    assert allowed, shape
    with torch.no_grad():
        for comp in allowed:
            tokens = tok.encode(x, fields, comp)
            assert tokens.shape == (1, T // comp.temporal, 4, H // comp.spatial, W // comp.spatial)
            assert tokens.shape[1] * tokens.shape[3] * tokens.shape[4] == tok.token_count(shape, comp)
            assert tok.decode(tokens, fields, comp).shape == x.shape
            assert tok.decode(tokens, ['B'], comp).shape == (1, T, 1, H, W)
    expected = {Compression(s, t) for s in (4, 8, 16) for t in (1, 2, 4) if H % s == 0 and W % s == 0 and T % t == 0}
    assert set(allowed) == expected


def test_compression_errors_list_allowed_levels():
    tok = small()
    with pytest.raises(ValueError, match=r'shape \(T=8, H=40, W=40\).*allowed for this shape: 4x1, 4x2, 4x4, 8x1, 8x2, 8x4'):
        tok.check_compression((8, 40, 40), (16, 1))
    with pytest.raises(ValueError, match=r'T must be divisible by temporal=4; allowed for this shape: 4x1, 4x2, 8x1, 8x2, 16x1, 16x2'):
        tok.check_compression((6, 64, 64), (8, 4))
    with pytest.raises(ValueError, match=r"spatial must be one of 4, 8, 16 and temporal one of 1, 2, 4"):
        tok.check_compression((8, 64, 64), (32, 1))
    with pytest.raises(ValueError, match=r'allowed for this shape: none \(H and W must be divisible by one of 4, 8, 16 and T by one of 1, 2, 4\)'):
        tok.check_compression((3, 10, 10), (4, 1))
    with pytest.raises(ValueError, match=r"'pressure' are not known to this tokeniser; known: 'A', 'B', 'vorticity', 'velocity_x', 'velocity_y'"):
        tok.encode(torch.zeros(1, 4, 1, 32, 32), ['pressure'], (8, 1))
    with pytest.raises(ValueError, match=r"'SPATIALxTEMPORAL'"):
        parse_levels('8x')
    with pytest.raises(ValueError, match=r'not one of 1, 2, 4, 8, 16, 32'):
        TokeniserConfig(FIELDS, spatial_levels=(3,))
    with pytest.raises(ValueError, match=r"norm='layer' is not one of 'group', 'rms'"):
        TokeniserConfig(FIELDS, norm='layer')
    with pytest.raises(ValueError, match=r'temporal level 8 needs stage strides \(2, 4\)'):
        TokeniserConfig(FIELDS, temporal_levels=(8,))


def test_parse_levels():
    assert parse_levels('4x1,8x1,8x2,16x4') == [(4, 1), (8, 1), (8, 2), (16, 4)]
    assert all(isinstance(c, Compression) for c in parse_levels('4x1'))
    assert as_compression(Compression(8, 2)) == as_compression((8, 2)) == as_compression('8x2') == (8, 2)
    for bad in ['', '8', 'x2', '8x2x1', '0x1', '8x-1', 'eightx2']:
        with pytest.raises(ValueError): parse_levels(bad)


def test_compression_table_ratio():
    tok = small(latent=16)
    table = tok.compression_table((8, 2, 64, 64))
    assert len(table) == 9 and all(r['fits'] for r in table)
    row = next(r for r in table if r['compression'] == '8x2')
    assert row['token_grid'] == (4, 8, 8) and row['tokens'] == 256 and row['ratio'] == 8 * 2 * 64 * 64 / (256 * 16)
    bad = {r['compression']: r for r in tok.compression_table((6, 48, 48))}
    assert not bad['16x4']['fits'] and bad['16x4']['tokens'] is None and bad['16x2']['tokens'] == 3 * 3 * 3


def test_float64_and_bf16_autocast_forward():
    tok = small()
    x = torch.randn(2, 4, 2, 32, 32)
    with torch.no_grad():
        ref = tok(x, ['A', 'B'], (8, 2))
        y64 = tok.double()(x.double(), ['A', 'B'], (8, 2))
        assert y64.dtype == torch.float64
        torch.testing.assert_close(y64.float(), ref, rtol=1e-4, atol=1e-4)
        tok.float()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            ybf = tok(x, ['A', 'B'], (8, 2))
        assert ybf.dtype == torch.bfloat16 and torch.isfinite(ybf).all()
        assert (ybf.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = tok(x, ['A', 'B'], (4, 1)).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in tok.parameters() if p.grad is not None)


def test_checkpoint_round_trip(tmp_path):
    tok = small(seed=1)
    save_checkpoint(tmp_path / 'tok.safetensors', model=tok.state_dict(), config=dict(tok.config.__dict__))
    parts = load_checkpoint(tmp_path / 'tok.safetensors')
    config = TokeniserConfig(**parts['config'])
    assert config == tok.config
    other = small(seed=2)
    other.load_state_dict(parts['model'])
    x = torch.randn(1, 4, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(other(x, ['A', 'B'], (8, 2)), tok(x, ['A', 'B'], (8, 2)))
    save_tokeniser(tmp_path / 'tok2.safetensors', tok, step=7)
    again = load_tokeniser(tmp_path / 'tok2.safetensors')
    assert again.config == tok.config and load_checkpoint(tmp_path / 'tok2.safetensors')['step'] == 7
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), tok.state_dict().values()))
    with pytest.raises(ValueError, match="not a tokeniser"):
        save_checkpoint(tmp_path / 'other.safetensors', weights={'w': torch.zeros(1)})
        load_tokeniser(tmp_path / 'other.safetensors')


def test_deterministic():
    "Same seed, same weights, same outputs and gradients, bit for bit (no torch.compile involved)."
    x = torch.randn(2, 4, 2, 32, 32)
    outs, grads = [], []
    for _ in range(2):
        tok = small(seed=3)
        y = tok(x, ['A', 'B'], (4, 2))
        y.square().mean().backward()
        outs.append(y.detach()); grads.append(torch.cat([p.grad.flatten() for p in tok.parameters() if p.grad is not None]))
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    with torch.no_grad(): assert torch.equal(tok(x, ['A', 'B'], (4, 2)), tok(x, ['A', 'B'], (4, 2)))


def test_periodic_shift_equivariance():
    tok = small().double()
    x = torch.randn(1, 4, 2, 32, 48, dtype=torch.float64)
    with torch.no_grad():
        for comp in tok.allowed_compressions((4, 32, 48)):
            S = comp.spatial
            torch.testing.assert_close(tok.encode(x.roll((S, -S), (-2, -1)), ['A', 'B'], comp),
                                       tok.encode(x, ['A', 'B'], comp).roll((1, -1), (-2, -1)))


def test_channel_permutation_and_mask():
    tok = small()
    x = torch.randn(2, 4, 3, 32, 32)
    fields = ['vorticity', 'velocity_x', 'velocity_y']
    with torch.no_grad():
        ref = tok.encode(x, fields, (8, 2))
        for perm in ([1, 2, 0], [2, 1, 0]):
            torch.testing.assert_close(tok.encode(x[:, :, perm], [fields[i] for i in perm], (8, 2)), ref)
        full = torch.full((2, 4, 5, 32, 32), float('nan'))                # absent channels may even hold NaN
        full[:, :, 2:] = x
        mask = torch.tensor([[0, 0, 1, 1, 1]] * 2, dtype=torch.bool)
        torch.testing.assert_close(tok.encode(full, FIELDS, (8, 2), channel_mask=mask), ref)
        half = mask.clone(); half[1, 3] = False                            # sample 1 lacks velocity_x
        x_drop = x.clone(); x_drop[1, :, 1] = 0
        torch.testing.assert_close(tok.encode(full, FIELDS, (8, 2), channel_mask=half)[1], tok.encode(x_drop, fields, (8, 2))[1])


def test_gradient_reaches_every_trunk_parameter_at_every_level():
    tok = small()
    x = torch.randn(1, 8, 2, 32, 32)
    for comp in tok.allowed_compressions((8, 32, 32)):
        tok.zero_grad(set_to_none=True)
        tok(x, ['A', 'B'], comp).square().mean().backward()
        groups = tok.parameter_groups()
        for p in groups['trunk'] + groups['norms']:
            assert p.grad is not None and p.grad.abs().sum() > 0, comp
        assert (tok.field_in.grad[2:] == 0).all() and (tok.field_in.grad[:2].abs().sum(1) > 0).all()


def test_parameter_groups_partition_and_with_fields():
    tok = small()
    groups = tok.parameter_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(tok.parameters()))
    more = tok.with_fields(['pressure', 'tracer'])
    assert more.field_names == FIELDS + ['pressure', 'tracer']
    x = torch.randn(1, 4, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(more(x, ['A', 'B'], (8, 1)), tok(x, ['A', 'B'], (8, 1)))
        assert more.decode(more.encode(x, ['A', 'B']), ['tracer']).shape == (1, 4, 1, 32, 32)


@pytest.mark.parametrize('stride', [2, 4])
def test_kernel_equal_to_stride_is_patchify(stride):
    "Oracle: a stage whose kernel equals its stride pads nothing and is a linear map on non-overlapping patches."
    torch.manual_seed(0)
    down = DownStage(3, 8, (stride, stride), groups=1)
    x = torch.randn(2, 3, 4, 8, 12, dtype=torch.float64)
    down.double()
    h = F.conv3d(pad_stage(x, down.kernel, (stride, stride)), down.conv.weight, down.conv.bias, stride=(stride, stride, stride))
    B, C, T, H, W = x.shape
    s = stride
    patches = x.reshape(B, C, T // s, s, H // s, s, W // s, s).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, T // s, H // s, W // s, -1)
    ref = patches @ down.conv.weight.reshape(8, -1).T + down.conv.bias
    torch.testing.assert_close(h, ref.permute(0, 4, 1, 2, 3))
    up = UpStage(8, 3, (stride, stride), groups=1).double()
    assert overlaps(up.kernel, (s, s)) == 1                                # no overlaps: averaging changes nothing
    with torch.no_grad(): y = up.upsample(h, (s, s)) - up.conv.bias[:, None, None, None]
    w = up.conv.weight.reshape(8, C, s, s, s)                              # (in, out, kt, kh, kw)
    ref = torch.einsum('bithw,iopqr->botphqwr', h, w).reshape(B, C, T, H, W)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize('mode', ['circular', 'zeros'])
def test_decoder_stage_is_adjoint_of_encoder_stage_up_to_the_overlaps(mode):
    "<E x, y> = (ks/ss)^2 <x, D y>: the decoder's transposed conv is the adjoint divided by the overlap count."
    torch.manual_seed(0)
    up = UpStage(4, 3, (1, 8), groups=1, padding_mode=mode).double()
    w = up.conv.weight.detach()                                            # (4, 3, 1, 8, 8): conv 3 -> 4, transposed 4 -> 3
    x = torch.randn(2, 3, 2, 16, 24, dtype=torch.float64)
    for s in (1, 2, 4, 8):
        ex = F.conv3d(pad_stage(x, (1, 8), (1, s), mode), w, stride=(1, s, s))
        y = torch.randn_like(ex)
        dy = crop_stage(F.conv_transpose3d(y, w, stride=(1, s, s)), (1, 8), (1, s), x.shape[-3:], mode)
        torch.testing.assert_close((ex * y).sum(), (x * dy).sum())         # the summing transposed conv: exact adjoint
        with torch.no_grad(): average = up.upsample(y, (1, s)) - up.conv.bias[:, None, None, None]
        assert overlaps((1, 8), (1, s)) == (8 / s) ** 2
        torch.testing.assert_close((ex * y).sum(), (8 / s) ** 2 * (x * average).sum())


@pytest.mark.parametrize('kernel', [(2, 8), (3, 4), (3, 6), (1, 4)])
def test_decoder_amplitude_does_not_depend_on_stride(kernel):
    "A constant token field decodes (per stage, periodic space, past the causal warm-up) to the same mean at every stride."
    kt, ks = kernel
    torch.manual_seed(kt * 10 + ks)
    up = UpStage(6, 4, kernel, groups=2).double()
    c = torch.randn(6, dtype=torch.float64)
    expected = torch.einsum('i,io->o', c, up.conv.weight.detach().mean((2, 3, 4))) + up.conv.bias.detach()
    for st in range(1, kt + 1):
        for ss in range(1, ks + 1):
            tokens = c[None, :, None, None, None].expand(1, 6, 4, 3, 5).contiguous()
            with torch.no_grad(): h = up.upsample(tokens, (st, ss))         # (1, 4, 4·st, 3·ss, 5·ss)
            start = -(-(kt - st) // st) * st                                 # whole periods past the warm-up kt - st
            torch.testing.assert_close(h[:, :, start:].mean((0, 2, 3, 4)), expected, msg=f'stride {(st, ss)}')
    # the summing transposed conv would have given overlaps x the same mean: 1 .. kt*ks^2 apart
    assert overlaps(kernel, (1, 1)) / overlaps(kernel, (kt, ks)) == kt * ks ** 2


def test_frame_norm_never_mixes_frames():
    for kind in ('group', 'rms'):
        norm = FrameNorm(8, 2, kind).double()
        x = torch.randn(2, 8, 6, 5, 7, dtype=torch.float64)
        m = dependency_matrix(lambda v: norm(v.transpose(1, 2)).transpose(1, 2), x.transpose(1, 2))
        assert torch.equal(m != 0, torch.eye(6, dtype=torch.bool)), kind


@pytest.mark.parametrize('mode', ['circular', 'zeros', 'replicate'])
def test_one_token_per_axis(mode):
    "The smallest window a level allows (H = W = spatial, T = temporal) encodes to one token and decodes back."
    tok = small(spatial_levels=(4, 8, 16, 32), padding_mode=mode)
    with torch.no_grad():
        for comp in tok.config.levels:
            x = torch.randn(1, comp.temporal, 1, comp.spatial, comp.spatial)
            tokens = tok.encode(x, ['A'], comp)
            assert tokens.shape == (1, 1, 4, 1, 1), comp
            assert tok.decode(tokens, ['A'], comp).shape == x.shape


def test_pretrain_notebook_runs_from_the_repository_root_and_writes_results(tmp_path):
    "04_pretrain runs end to end with papermill from the repository root (tiny steps) and writes results for every level."
    import json, os
    from pathlib import Path
    papermill = pytest.importorskip('papermill')
    root = Path(__file__).resolve().parents[1]
    out_dir = tmp_path / 'tokrun'
    os.environ.setdefault('OMP_NUM_THREADS', '1'); os.environ['PHYSNB_PROGRESS'] = '0'
    papermill.execute_notebook(str(root / 'nbs' / '04_pretrain.ipynb'), str(tmp_path / 'executed.ipynb'), cwd=str(root),
                               parameters=dict(steps=4, width=16, latent=4, out_dir=str(out_dir)), progress_bar=False,
                               kernel_name='python3')
    results = json.loads((out_dir / 'results.json').read_text())
    assert results['schema'] == 'physnb.results/1' and results['experiment'] == 'tokeniser_pretrain'
    assert results['metrics']['steps'] == 4 and results['parameters']['width'] == 16
    assert results['parameters']['levels'] == ['4x1', '8x1', '8x2', '16x4'] and results['figures'] == ['report.html']
    rows = [r for r in results['metrics']['rows'] if r['field'] == 'all']
    assert [r['level'] for r in rows] == results['parameters']['levels'] and all(0 < r['vrmse_mean'] < 100 for r in rows)
    assert (out_dir / 'tokeniser.safetensors').exists() and load_tokeniser(out_dir / 'tokeniser.safetensors').config.width == 16


def test_pretrain_notebook_refuses_a_misspelt_parameter(tmp_path):
    "04_pretrain fails in its first checks on a misspelt -p name, before any data is generated."
    import os
    from pathlib import Path
    papermill = pytest.importorskip('papermill')
    root = Path(__file__).resolve().parents[1]
    os.environ.setdefault('OMP_NUM_THREADS', '1'); os.environ['PHYSNB_PROGRESS'] = '0'
    with pytest.raises(papermill.PapermillExecutionError, match=r"unknown parameter\(s\) 'setps'"):
        papermill.execute_notebook(str(root / 'nbs' / '04_pretrain.ipynb'), str(tmp_path / 'executed.ipynb'), cwd=str(root),
                                   parameters=dict(setps=4, out_dir=str(tmp_path / 'run')), progress_bar=False,
                                   kernel_name='python3')
    assert not (tmp_path / 'run').exists()
