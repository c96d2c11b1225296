"physnb.train.autoencoding: resume after SIGKILL, DDP equals one process, one level per step on every rank, masked channels, errors, report numbers."
import json, os, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from physnb.core import load_checkpoint
from physnb.data.generate import generate_dataset
from physnb.sim.systems import SYSTEMS
from physnb.models.tokeniser import Compression, Tokeniser, TokeniserConfig
from physnb.data.windows import FieldWindows
from physnb.train.autoencoding import (AutoencodingTask, as_levels, fields_and_mask,
                                       compare_adjustable, masked_mse, masked_vrmse, pretrain_tokeniser,
                                       reconstruction_report)
from physnb.train.trainer import steps_config
from _launch import torchrun

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PHYSNB_PROGRESS': '0', 'PYTHONPATH': str(ROOT)}
LEVELS = '4x1,8x1,8x2,16x4'


@pytest.fixture(scope='module')
def roots(tmp_path_factory):
    "Tiny gray_scott (32x32) and ns2d (32x64) Well datasets, 5 trajectories of 13 frames each."
    tmp = tmp_path_factory.mktemp('data')
    return {n: generate_dataset(SYSTEMS[n], tmp, n_traj=5, res=32, steps=12, seed=0, progress=False)['root']
            for n in ('gray_scott', 'ns2d')}


def small(fields, seed=0):
    torch.manual_seed(seed)
    return Tokeniser(TokeniserConfig(field_names=fields, width=16, latent=8))


# The child: pretrain on gray_scott (or the mixture) with levels drawn per step; it logs the compression every
# training forward really used (per rank), can SIGKILL itself after a step, and writes the final weights.
SCRIPT = textwrap.dedent('''
    import json, os, signal, sys
    import torch
    from physnb.core import save_checkpoint
    from physnb.models.tokeniser import Tokeniser, TokeniserConfig
    from physnb.data.windows import FieldWindows
    from physnb.train.autoencoding import pretrain_tokeniser
    from physnb.train.trainer import steps_config
    torch.set_num_threads(1)
    out_dir, kill_at, init_seed, sources = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(',')
    rank = int(os.environ.get('RANK', '0'))
    train = FieldWindows(sources, 'train', window=8, crop=(32, 32))

    class Logged(Tokeniser):
        def forward(self, x, fields, compression=(8, 1), channel_mask=None):
            if self.training:
                with open(os.path.join(out_dir, f'levels_rank{rank}.txt'), 'a') as f: f.write(f'{compression[0]}x{compression[1]}\\n')
            return super().forward(x, fields, compression, channel_mask)

    # groups=4 < embed=8: with one channel per group, a conv bias right before a group norm is removed by it, its
    # gradient is rounding noise, and Adam turns that noise into O(lr) steps that differ between DDP and one process
    torch.manual_seed(init_seed)                 # a resumed run starts from other weights
    tok = Logged(TokeniserConfig(field_names=train.field_names, width=16, latent=8, embed=8, groups=4))
    def killer(trainer, event):
        if event == 'step' and trainer.step == kill_at: os.kill(os.getpid(), signal.SIGKILL)
    os.makedirs(out_dir, exist_ok=True)
    config = steps_config(12, len(train), 8, lr=3e-3, device='cpu', out_dir=out_dir, save_every=3)
    run = pretrain_tokeniser(tok, train, None, '4x1,8x1,8x2,16x4', config, callbacks=[killer])
    print('TRAINING_DONE', rank, run['steps'], flush=True)
    if rank == 0: save_checkpoint(os.path.join(out_dir, 'final.safetensors'), model=run['trainer'].model.state_dict(),
                                task=run['task'].state_dict())
''')


def _run(tmp_path, out_dir, kill_at, init_seed, sources, launcher=None, timeout=300):
    script = tmp_path / 'child.py'
    script.write_text(SCRIPT)
    cmd = (launcher or [sys.executable]) + [str(script), str(out_dir), str(kill_at), str(init_seed), ','.join(map(str, sources))]
    return subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def _levels(out_dir, rank=0): return (Path(out_dir) / f'levels_rank{rank}.txt').read_text().split()


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, roots):
    "12 steps on gray_scott in one process, never killed."
    tmp = tmp_path_factory.mktemp('one')
    r = _run(tmp, tmp / 'a', -1, 0, [roots['gray_scott']])
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / 'a'


def test_resume_after_sigkill_is_bit_identical(tmp_path, roots, uninterrupted):
    "Killed at step 7 (last checkpoint: step 6), resumed from other initial weights: same weights, same levels."
    killed = _run(tmp_path, tmp_path / 'b', 7, 0, [roots['gray_scott']])
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    assert load_checkpoint(tmp_path / 'b' / 'last.safetensors')['task']['step'] == 6        # the task's level counter
    resumed = _run(tmp_path, tmp_path / 'b', -1, 123, [roots['gray_scott']])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    wa, wb = load_checkpoint(uninterrupted / 'final.safetensors')['model'], load_checkpoint(tmp_path / 'b' / 'final.safetensors')['model']
    for name, tensor in wa.items(): assert torch.equal(tensor, wb[name]), name
    assert load_checkpoint(tmp_path / 'b' / 'final.safetensors')['task']['step'] == 12
    # the killed run trained steps 0..6 (7 forwards), the resumed one redid step 6 onwards: the same level sequence
    whole, parts = _levels(uninterrupted), _levels(tmp_path / 'b')
    assert len(whole) == 12 and parts[:6] + parts[7:] == whole and len(set(whole)) > 1


def test_levels_are_a_pure_function_of_seed_and_step():
    task = AutoencodingTask(['A'], LEVELS, seed=3)
    seq = [task.level_at(s) for s in range(200)]
    assert seq == [AutoencodingTask(['A'], LEVELS, seed=3).level_at(s) for s in range(200)]
    assert seq != [AutoencodingTask(['A'], LEVELS, seed=4).level_at(s) for s in range(200)]
    assert set(seq) == set(as_levels(LEVELS))


def _close_weights(one: dict, two: dict):
    """Same weights up to summation order: the gradient all-reduce adds in another order, and Adam magnifies the
    rounding in entries with tiny gradients; a different batch or level would move weights by ~lr = 3e-3 per step.
    `one`, `two`: final checkpoints (the model's weights and the task's level counter)."""
    assert one['task']['step'] == two['task']['step']
    one, two = one['model'], two['model']
    for name, tensor in one.items(): torch.testing.assert_close(two[name], tensor, rtol=1e-3, atol=1e-4, msg=name)
    diff = torch.cat([(two[k] - v).flatten().double() for k, v in one.items()]).norm()
    norm = torch.cat([v.flatten().double() for k, v in one.items()]).norm()
    assert diff / norm < 1e-5, (diff / norm).item()


@pytest.mark.slow
def test_ddp_matches_one_process_and_ranks_share_levels(tmp_path, roots, uninterrupted):
    "Two gloo ranks (4 windows each) follow the single process on the same global batch of 8, level for level."
    r = _run(tmp_path, tmp_path / 'two', -1, 0, [roots['gray_scott']], launcher=torchrun())
    if r.returncode != 0 and 'TRAINING_DONE' not in r.stdout and 'physnb' not in r.stderr:
        pytest.skip(f'torchrun could not start: {r.stderr[-500:]}')
    assert r.returncode == 0 and r.stdout.count('TRAINING_DONE') == 2, r.stderr[-4000:]
    assert _levels(tmp_path / 'two', 0) == _levels(tmp_path / 'two', 1) == _levels(uninterrupted)
    _close_weights(load_checkpoint(uninterrupted / 'final.safetensors'), load_checkpoint(tmp_path / 'two' / 'final.safetensors'))


@pytest.mark.slow
def test_ddp_on_a_mixture_matches_one_process(tmp_path, roots):
    "With samples of 2 and 5 channels mixed over the ranks, the per-sample loss keeps DDP equal to one process."
    sources = [roots['gray_scott'], roots['ns2d']]
    one = _run(tmp_path, tmp_path / 'one', -1, 0, sources)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(tmp_path, tmp_path / 'two', -1, 0, sources, launcher=torchrun())
    assert two.returncode == 0, two.stderr[-4000:]
    _close_weights(load_checkpoint(tmp_path / 'one' / 'final.safetensors'), load_checkpoint(tmp_path / 'two' / 'final.safetensors'))


def test_absent_channels_get_no_gradient_and_do_not_train(roots):
    "ns2d samples in a gray_scott+ns2d mixture: the A and B rows of the field tables receive exactly zero gradient."
    mixture = FieldWindows([roots['gray_scott'], roots['ns2d']], 'train', window=8, crop=(32, 32))
    ns2d = [i for i in range(len(mixture)) if mixture[i]['dataset_index'] == 1]
    tok = small(mixture.field_names)
    batch = torch.utils.data.default_collate([mixture[i] for i in ns2d[:4]])
    x, mask = fields_and_mask(batch)
    masked_mse(tok(x + 5.0 * ~mask[:, None, :, None, None], mixture.field_names, (8, 1), mask),
               x, mask).backward()                                  # garbage in the absent channels must not matter
    for table in (tok.field_in, tok.field_out, tok.field_out_bias):
        assert (table.grad[:2] == 0).all() and (table.grad[2:] != 0).any()

    class NS2DPart(FieldWindows):                                   # the mixture's channels, ns2d samples only
        def __len__(self): return len(ns2d)
        def __getitem__(self, i): return super().__getitem__(ns2d[i])
    part = NS2DPart([roots['gray_scott'], roots['ns2d']], 'train', window=8, crop=(32, 32))
    tok = small(mixture.field_names); before = {k: v.clone() for k, v in tok.state_dict().items()}
    pretrain_tokeniser(tok, part, None, LEVELS, steps_config(6, len(part), 4, lr=1e-2))
    after = tok.state_dict()
    for k in ('field_in', 'field_out', 'field_out_bias'):
        assert torch.equal(after[k][:2], before[k][:2]) and not torch.equal(after[k][2:], before[k][2:]), k


def test_errors_name_what_is_allowed(roots):
    train = FieldWindows(roots['gray_scott'], 'train', window=8)
    tok = small(['A', 'B'])
    with pytest.raises(ValueError, match=r"level 32x1 does not fit .*spatial must be one of 4, 8, 16"):
        pretrain_tokeniser(tok, train, levels='8x1,32x1')
    with pytest.raises(ValueError, match=r"level 8x4 does not fit .*T must be divisible"):
        pretrain_tokeniser(tok, FieldWindows(roots['gray_scott'], 'train', window=6), levels='8x4')
    with pytest.raises(ValueError, match=r"fields \['tracer', 'pressure', 'vorticity', 'velocity_x', 'velocity_y'\] that the tokeniser does not know"):
        pretrain_tokeniser(tok, FieldWindows(roots['ns2d'], 'train', window=8), levels='8x1')
    with pytest.raises(ValueError, match="is not 'SPATIALxTEMPORAL'"): as_levels('8by1')
    with pytest.raises(ValueError, match='more than once'): as_levels('8x1,8x1')
    with pytest.raises(ValueError, match="budget='half' is not one of 'per_model', 'total'"):
        compare_adjustable(lambda: small(['A', 'B']), train, train, '8x1', steps=1, budget='half')


class Zero(nn.Module):
    "A stand-in tokeniser that reconstructs every field as zero, with 1 latent channel on the token grid."
    def encode(self, x, fields, compression, channel_mask=None):
        s, t = compression
        return x[:, ::t, :1, ::s, ::s]
    def decode(self, tokens, fields, compression, size=None):
        s, t = compression
        B, T, _, h, w = tokens.shape
        return torch.zeros(B, T * t, len(fields), h * s, w * s)


def test_report_matches_a_hand_computation(roots):
    "Predicting zero: VRMSE = sqrt(mean(u²) / var(u)) per frame, and error/signal power = 1 in every band (up to eps)."
    windows = FieldWindows(roots['ns2d'], 'valid', window=4, crop=(32, 32))
    rows = reconstruction_report(Zero(), windows, '8x2,16x4', batch_size=3)
    u = np.stack([windows[i]['fields'].numpy() for i in range(len(windows))]).astype(np.float64)  # (N, T, C, H, W)
    hand = np.sqrt((u ** 2).mean((3, 4)) / (u.var((3, 4), ddof=1) + 1e-7))                       # (N, T, C)
    for r in rows:
        if r['field'] == 'all':
            assert r['vrmse_mean'] == pytest.approx(hand.mean(1).mean(0).mean(), rel=1e-5)
            assert r['vrmse_median'] == pytest.approx(np.median(hand.mean((1, 2))), rel=1e-5)
            continue
        c = windows.field_names.index(r['field'])
        assert r['vrmse_mean'] == pytest.approx(hand[:, :, c].mean(), rel=1e-5)
        assert r['vrmse_median'] == pytest.approx(np.median(hand[:, :, c]), rel=1e-5)
        # error power = signal power in every band: P / (P + eps) with eps = 1e-7, i.e. 1 wherever the band holds signal
        assert r['spectral_low'] == pytest.approx(1.0, rel=1e-4)
        for band in ('mid', 'high'): assert 0.5 < r[f'spectral_{band}'] <= 1.0 + 1e-6
        assert r['n'] == len(windows) * 4
    by_level = {r['level']: r for r in rows if r['field'] == 'all'}
    assert by_level['8x2']['tokens'] == 2 * 4 * 4 and by_level['16x4']['tokens'] == 1 * 2 * 2
    assert by_level['8x2']['compression_ratio'] == pytest.approx(4 * 5 * 32 * 32 / (2 * 4 * 4 * 1))


def test_masked_vrmse_is_the_trainer_metric_of_the_report(roots):
    "The validation metric (masked_vrmse, per sample) averaged over windows equals the report's 'all' mean when every sample has every field."
    windows = FieldWindows(roots['gray_scott'], 'valid', window=8)
    tok = small(windows.field_names).eval()
    rows = reconstruction_report(tok, windows, '8x1')
    batch = torch.utils.data.default_collate([windows[i] for i in range(len(windows))])
    x, mask = fields_and_mask(batch)
    with torch.no_grad(): per_sample = masked_vrmse(tok(x, windows.field_names, (8, 1)), x, mask)
    assert per_sample.mean().item() == pytest.approx(next(r for r in rows if r['field'] == 'all')['vrmse_mean'], rel=1e-5)


def test_total_budget_splits_the_steps(roots):
    "budget='total': each fixed model gets steps // L, and the FLOP accounting adds up."
    train = FieldWindows(roots['gray_scott'], 'train', window=8)
    res = compare_adjustable(lambda: small(train.field_names), train, train, '8x1,16x4', steps=4, budget='total', max_samples=4)
    c = res['compute']
    assert c['fixed_steps'] == {'8x1': 2, '16x4': 2} and [r['fixed_steps'] for r in res['rows']] == [2, 2]
    assert sum(r['adjustable_steps_at_level'] for r in res['rows']) == 4
    assert c['fixed_total_gflops'] == pytest.approx(2 * sum(c['step_gflops'].values()))
    assert all(r['ratio'] == pytest.approx(r['adjustable_vrmse'] / r['fixed_vrmse']) for r in res['rows'])
    json.dumps(res['rows']); json.dumps(res['compute'])                           # JSON-able


@pytest.mark.oracle
def test_field_windows_read_the_wells_own_files(tmp_path):
    "The Well's dummy file (written by the_well itself) loads through the same reader: vector field, channels first."
    dummy = pytest.importorskip('the_well.utils.dummy_data')
    d = tmp_path / 'dummy' / 'data' / 'train'; d.mkdir(parents=True)
    dummy.write_dummy_data(str(d / 'data.hdf5'))
    windows = FieldWindows(d, None, window=4, normalisation=None)
    assert windows.field_names == ['field_x', 'field_y'] and len(windows) == 2 * (10 - 4 + 1)
    sample = windows[0]
    assert sample['fields'].shape == (4, 2, 32, 32) and sample['channel_mask'].all()
    tok = small(windows.field_names)
    rows = reconstruction_report(tok, windows, '8x1,16x4', max_samples=4)
    assert {r['field'] for r in rows} == {'field_x', 'field_y', 'all'} and all(np.isfinite(r['vrmse_mean']) for r in rows)


def test_flops_budget_buys_each_fixed_model_the_adjustable_models_flops(roots):
    "budget='flops': fixed steps = adjustable FLOPs / FLOPs per step at the level, so each fixed model costs the same (to one step)."
    train = FieldWindows(roots['gray_scott'], 'train', window=8)
    res = compare_adjustable(lambda: small(train.field_names), train, train, '8x1,16x4', steps=4, budget='flops', max_samples=2)
    c = res['compute']
    assert c['fixed_steps']['16x4'] > c['fixed_steps']['8x1'] >= 1                 # the cheaper level gets more steps
    for level, gflops in c['fixed_gflops'].items():
        assert abs(gflops - c['adjustable_gflops']) <= c['step_gflops'][level] / 2 + 1e-9, level
