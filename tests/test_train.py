"physnb.train.trainer: bit-identical resume after a real SIGKILL, DDP under torchrun equals one process, freezing, config checks."
import json, os, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from physnb.core import load_checkpoint
from physnb.train.trainer import Regression, Task, TrainConfig, Trainer, lr_factor
from _launch import torchrun

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PHYSNB_PROGRESS': '0', 'PYTHONPATH': str(ROOT)}

# The child script: a small conv net with dropout on heat-equation pairs; shuffled data, per-step cosine
# with warm-up, AdamW, grad clipping. It can SIGKILL itself after a given step or epoch (a real kill: no
# cleanup, no finally blocks), and it writes the final weights to `final.safetensors`.
SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import torch
    from torch import nn
    from physnb.core import save_checkpoint
    from physnb.train.trainer import TrainConfig, Trainer
    torch.set_num_threads(1)
    out_dir, kill_event, kill_at, seed, dropout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])

    def pairs(n, seed):
        g = torch.Generator().manual_seed(seed)
        k = torch.fft.fftfreq(32, 1 / 32)
        u0 = torch.fft.ifft(torch.randn(n, 32, dtype=torch.complex64, generator=g) / (1 + k.abs()) ** 1.5).real * 32
        ut = torch.fft.ifft(torch.fft.fft(u0) * torch.exp(-2.0 * (2 * torch.pi * k / 32) ** 2)).real
        return torch.utils.data.TensorDataset(u0[:, None].float(), ut[:, None].float())

    torch.manual_seed(seed)                       # the resumed run starts from *different* random weights
    model = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2, padding_mode='circular'), nn.GELU(), nn.Dropout(dropout),
                          nn.Conv1d(8, 1, 5, padding=2, padding_mode='circular'))
    def killer(trainer, event):
        now = trainer.step if event == 'step' else trainer.epoch
        if event == kill_event and now == kill_at: os.kill(os.getpid(), signal.SIGKILL)
    config = TrainConfig(epochs=4, batch_size=32, lr=3e-3, optimizer='adamw', weight_decay=1e-2, schedule_unit='step',
                         warmup=4, grad_clip=1.0, device='cpu', out_dir=out_dir, save_every=5, progress=False)
    trainer = Trainer(model, pairs(256, 0), pairs(64, 1), config, callbacks=[killer])
    print('TRAINING_STARTED', trainer.rank, flush=True)
    result = trainer.fit()
    print('TRAINING_DONE', trainer.rank, result['steps'], flush=True)
    if trainer.rank == 0:
        save_checkpoint(os.path.join(out_dir, 'final.safetensors'), model=trainer.model.state_dict(), history=result['history'])
    if torch.distributed.is_initialized(): torch.distributed.barrier()   # leave together: a rank exiting while rank 0 still
                                                                          # writes aborted in gloo's teardown on a loaded 2-core box
''')


def _run(tmp_path, *args, launcher=None, timeout=240):
    script = tmp_path / 'child.py'
    script.write_text(SCRIPT)
    cmd = (launcher or [sys.executable]) + [str(script), *map(str, args)]
    return subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def _final(out_dir):
    return load_checkpoint(Path(out_dir) / 'final.safetensors')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    "Run A: 4 epochs of 8 steps in one process, never killed."
    tmp = tmp_path_factory.mktemp('one')
    a = _run(tmp, tmp / 'a', 'never', -1, 0, 0.1)
    assert a.returncode == 0, a.stderr[-3000:]
    return tmp / 'a'


@pytest.mark.parametrize('kill_event,kill_at', [('epoch', 2), ('step', 13)])
def test_resume_after_sigkill_is_bit_identical(tmp_path, uninterrupted, kill_event, kill_at):
    """Run A trains 4 epochs (8 steps each) in one go. Run B SIGKILLs itself after epoch 2, or at step 13
    (its last checkpoint is step 10, mid-epoch), then a fresh process with other initial weights resumes."""
    killed = _run(tmp_path, tmp_path / 'b', kill_event, kill_at, 0, 0.1)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])          # really killed
    assert 'TRAINING_DONE' not in killed.stdout
    saved = load_checkpoint(tmp_path / 'b' / 'last.safetensors')['trainer']
    assert (saved['epoch'], saved['step_in_epoch']) == ((2, 0) if kill_event == 'epoch' else (1, 2))
    resumed = _run(tmp_path, tmp_path / 'b', 'never', -1, 123, 0.1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    wa, wb = _final(uninterrupted), _final(tmp_path / 'b')
    for name, tensor in wa['model'].items():
        assert torch.equal(tensor, wb['model'][name]), name
    for ra, rb in zip(wa['history'], wb['history']):
        assert (ra['train_loss'], ra['valid_metric'], ra['lr']) == (rb['train_loss'], rb['valid_metric'], rb['lr'])
    assert json.loads((tmp_path / 'b' / 'history.json').read_text())[-1]['step'] == 32


def _torchrun_or_skip(result):
    "Skip (not fail) when torchrun could not even start its process group on this machine."
    out = result.stdout + result.stderr
    if result.returncode != 0 and 'TRAINING_STARTED' not in out and 'physnb' not in out and 'child.py' not in out:
        pytest.skip(f'torchrun could not start: {result.stderr[-500:]}')
    return result


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    "One uninterrupted 2-rank gloo run (global batch 32, 16 per rank), shared by the DDP tests."
    tmp = tmp_path_factory.mktemp('ddp')
    result = _torchrun_or_skip(_run(tmp, tmp / 'two', 'never', -1, 0, 0.1, launcher=torchrun()))
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp, result


@pytest.mark.slow
def test_ddp_under_torchrun_matches_one_process(tmp_path, ddp_run):
    "Two gloo ranks on a global batch of 32 (16 each) follow the single-process run on the same batches."
    tmp, ddp = ddp_run
    assert ddp.stdout.count('TRAINING_DONE') == 2                                     # both ranks trained ...
    assert sorted(p.name for p in (tmp / 'two').iterdir() if not p.name.startswith('.')) == \
        ['best.safetensors', 'final.safetensors', 'history.json', 'last.safetensors']   # ... rank 0 wrote
    # dropout masks differ per rank (rank r is seeded seed + r), so the comparison runs with dropout off
    plain_one = _run(tmp_path, tmp_path / 'one0', 'never', -1, 0, 0.0)
    plain_two = _torchrun_or_skip(_run(tmp_path, tmp_path / 'two0', 'never', -1, 0, 0.0, launcher=torchrun()))
    assert plain_one.returncode == 0 and plain_two.returncode == 0, plain_two.stderr[-3000:]
    one, two = _final(tmp_path / 'one0'), _final(tmp_path / 'two0')
    for name, tensor in one['model'].items():
        torch.testing.assert_close(two['model'][name], tensor, rtol=1e-4, atol=1e-5)
    assert len(one['history']) == len(two['history']) == 4
    for r1, r2 in zip(one['history'], two['history']):
        assert r1['step'] == r2['step'] == 8 * (r1['epoch'] + 1)                     # same number of global steps
        assert r1['train_loss'] == pytest.approx(r2['train_loss'], rel=1e-5)
        assert r1['valid_metric'] == pytest.approx(r2['valid_metric'], rel=1e-5)   # all-reduced over both shards


@pytest.mark.slow
def test_ddp_resume_after_sigkill_is_bit_identical(tmp_path, ddp_run):
    "Both ranks SIGKILL themselves at step 13 (checkpoint at step 10); torchrun relaunched resumes bit-identically."
    tmp, _ = ddp_run
    killed = _torchrun_or_skip(_run(tmp_path, tmp_path / 'b', 'step', 13, 0, 0.1, launcher=torchrun()))
    assert killed.returncode != 0 and 'TRAINING_DONE' not in killed.stdout
    assert load_checkpoint(tmp_path / 'b' / 'last.safetensors')['trainer']['step'] == 10
    resumed = _run(tmp_path, tmp_path / 'b', 'never', -1, 123, 0.1, launcher=torchrun())
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    wa, wb = _final(tmp / 'two'), _final(tmp_path / 'b')
    for name, tensor in wa['model'].items():
        assert torch.equal(tensor, wb['model'][name]), name
    assert [r['valid_metric'] for r in wa['history']] == [r['valid_metric'] for r in wb['history']]


def _pairs(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 16, generator=g)
    return torch.utils.data.TensorDataset(x, 2 * x.roll(1, -1))


def test_frozen_parameters_never_move_and_never_reach_the_optimiser():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.Conv1d(4, 1, 3, padding=1))
    model[0].requires_grad_(False)
    before = [p.clone() for p in model[0].parameters()]
    trainer = Trainer(model, _pairs(), config=TrainConfig(epochs=2, batch_size=16, device='cpu', progress=False))
    trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, model[0].parameters()))
    in_optimiser = {id(p) for g in trainer.optimizer.param_groups for p in g['params']}
    assert in_optimiser == {id(p) for p in model[1].parameters()}


def test_resume_refuses_a_changed_config(tmp_path):
    def trainer(**kw):
        torch.manual_seed(0)
        recipe = dict(epochs=2, batch_size=16, device='cpu', progress=False, out_dir=str(tmp_path))
        return Trainer(nn.Conv1d(1, 1, 3, padding=1), _pairs(), config=TrainConfig(**{**recipe, **kw}))
    trainer().fit()
    with pytest.raises(ValueError, match=r"batch_size=16.*batch_size=32"):
        trainer(batch_size=32).fit()
    trainer(save_every=3, eval_every=2).fit()                      # watching differently is allowed
    trainer(batch_size=32).fit(resume=False)                       # or start over explicitly


def test_cosine_per_epoch_is_the_papers_cosine_annealing():
    model = nn.Linear(1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=500)
    for epoch in range(500):
        assert lr_factor(epoch, 500) * 1e-3 == pytest.approx(opt.param_groups[0]['lr'], rel=1e-9, abs=1e-15)
        opt.step(); sched.step()


def test_bad_choices_name_what_is_allowed():
    with pytest.raises(ValueError, match="optimizer='lion' is not one of 'adam', 'adamw'"):
        TrainConfig(optimizer='lion')
    with pytest.raises(ValueError, match="schedule='linear' is not one of 'cosine', 'constant'"):
        TrainConfig(schedule='linear')


@pytest.mark.parametrize('field,value,message', [
    ('lr', -1, 'lr=-1 must be a finite number > 0'),
    ('lr', 0.0, 'lr=0.0 must be a finite number > 0'),
    ('lr', float('nan'), 'lr=nan must be a finite number > 0'),
    ('weight_decay', -1, 'weight_decay=-1 must be a finite number >= 0'),
    ('min_lr', 0.01, r'min_lr=0.01 must be in \[0, lr=0.001\]'),
    ('min_lr', -1e-5, r'min_lr=-1e-05 must be in \[0, lr=0.001\]'),
    ('grad_clip', 0, 'grad_clip=0 must be a finite number > 0, or None'),
    ('grad_clip', -1.0, 'grad_clip=-1.0 must be a finite number > 0, or None'),
    ('max_steps', 0, 'max_steps=0 must be >= 1, or None'),
    ('num_workers', -1, 'num_workers=-1 must be >= 0'),
    ('warmup', -1, 'warmup=-1 must be >= 0'),
    ('save_every', -2, 'save_every=-2 must be >= 0'),
    ('epochs', 0, 'epochs=0 must be >= 1'),
    ('betas', (0.9,), r'betas=\(0.9,\) must be two numbers in \[0, 1\)'),
    ('betas', (0.9, 1.0), r'betas=\(0.9, 1.0\) must be two numbers in \[0, 1\)'),
    ('device', 'gpu', "device='gpu' is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"),
    ('device', 'cuda:x', "device='cuda:x' is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"),
])
def test_bad_values_say_what_is_wrong_and_what_is_allowed(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_valid_edge_values_and_absent_hardware_are_accepted():
    TrainConfig(min_lr=1e-3, grad_clip=0.5, max_steps=1, betas=[0.0, 0.5], weight_decay=0.0, num_workers=0)
    for name in ('auto', 'cpu', 'cuda', 'cuda:1', 'mps'):      # names get_device knows; hardware is checked by the Trainer
        TrainConfig(device=name)


class _NaNAfter(nn.Module):
    "A 1x1 convolution that outputs NaN once `poisoned` is set."
    def __init__(self):
        super().__init__(); self.conv, self.poisoned = nn.Conv1d(1, 1, 1), False
    def forward(self, x): return self.conv(x) * (float('nan') if self.poisoned else 1.0)


def test_non_finite_loss_raises_and_keeps_the_last_checkpoint(tmp_path):
    "A NaN loss mid-run raises FloatingPointError naming epoch and step; last/best.safetensors stay finite and resumable."
    torch.manual_seed(0)
    model = _NaNAfter()
    def poison(trainer, event):
        if event == 'step' and trainer.step == 6: model.poisoned = True     # epoch 1 (4 steps per epoch), step 6
    recipe = dict(epochs=3, batch_size=16, device='cpu', progress=False, out_dir=str(tmp_path))
    trainer = Trainer(model, _pairs(), _pairs(32), TrainConfig(**recipe), callbacks=[poison])
    with pytest.raises(FloatingPointError, match=r'training loss is nan at epoch 1, step 6 .*lower lr'):
        trainer.fit()
    assert trainer.history and all(np.isfinite(r['train_loss']) for r in trainer.history)
    assert all(p.isfinite().all() for p in model.parameters())        # raised before the optimiser step
    last = load_checkpoint(tmp_path / 'last.safetensors')
    assert (last['trainer']['epoch'], last['trainer']['step']) == (1, 4)
    assert all(v.isfinite().all() for v in last['model'].values())
    assert all(v.isfinite().all() for v in load_checkpoint(tmp_path / 'best.safetensors')['model'].values())
    trainer.load_best()                                                # the best of epoch 0, not the misleading "call fit()"
    model.poisoned = False
    result = Trainer(model, _pairs(), _pairs(32), TrainConfig(**recipe)).fit()
    assert [r['epoch'] for r in result['history']] == [0, 1, 2] and result['best_epoch'] is not None


def test_non_finite_validation_metric_raises_before_it_is_recorded():
    nan_metric = lambda pred, target: torch.full((len(pred),), float('inf'))
    trainer = Trainer(nn.Conv1d(1, 1, 1), _pairs(), _pairs(32), TrainConfig(epochs=2, batch_size=16, device='cpu', progress=False),
                      Regression(metric=nan_metric))
    with pytest.raises(FloatingPointError, match=r'validation metric is inf after epoch 0 .*4 optimiser steps'):
        trainer.fit()
    assert trainer.history == [] and trainer.best_epoch is None


def test_a_frozen_model_evaluates_but_does_not_train():
    model = nn.Conv1d(1, 1, 1, bias=False).requires_grad_(False)
    trainer = Trainer(model, _pairs(), config=TrainConfig(batch_size=16, device='cpu', progress=False))
    x, y = _pairs().tensors
    expected = (torch.linalg.vector_norm((model(x) - y).flatten(1), dim=1) / torch.linalg.vector_norm(y.flatten(1), dim=1)).mean()
    assert trainer.evaluate(_pairs()) == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(trainer.predict(x), model(x))
    with pytest.raises(ValueError, match='nothing to train'):
        trainer.fit()


def test_resuming_at_max_steps_trains_no_further(tmp_path):
    recipe = dict(epochs=2, batch_size=16, device='cpu', progress=False, out_dir=str(tmp_path), max_steps=3)
    assert Trainer(nn.Conv1d(1, 1, 1), _pairs(), config=TrainConfig(**recipe)).fit()['steps'] == 3
    again = Trainer(nn.Conv1d(1, 1, 1), _pairs(), config=TrainConfig(**recipe)).fit()
    assert again['steps'] == 3 and again['stopped']


class CountingTask(Task):
    "A task with its own state (a step counter) and two named loss parts; validation reports two metrics."
    metric = 'mae'
    def __init__(self): self.step = 0
    def loss(self, model, batch):
        x, y = batch; self.step += 1
        err = model(x) - y
        return {'loss': err.pow(2).mean(), 'mse': err.pow(2).mean(), 'step': torch.tensor(float(self.step))}
    def metrics(self, model, batch):
        x, y = batch; err = (model(x) - y).flatten(1)
        return {'mae': err.abs().mean(1), 'batch_max': err.abs().max()}   # per sample, and one value per batch
    def predict(self, model, batch): return model(batch[0])
    def state_dict(self): return {'step': self.step}
    def load_state_dict(self, state): self.step = int(state['step'])


def test_a_task_owns_loss_parts_metrics_and_state(tmp_path):
    "The trainer records the task's parts, selects by task.metric, keeps every metric, and resumes the task's state."
    recipe = dict(epochs=2, batch_size=16, device='cpu', progress=False, out_dir=str(tmp_path), max_steps=5)
    task = CountingTask()
    trainer = Trainer(nn.Conv1d(1, 1, 1), _pairs(), _pairs(32), TrainConfig(**recipe), task)
    trainer.fit()
    assert task.step == 5 and trainer.last_parts['step'].item() == 5.0 and set(trainer.last_parts) == {'mse', 'step'}
    resumed_task = CountingTask()
    resumed = Trainer(nn.Conv1d(1, 1, 1), _pairs(), _pairs(32), TrainConfig(**{**recipe, 'max_steps': None}), resumed_task)
    out = resumed.fit()
    assert resumed_task.step == 8 == out['steps']                      # 4 steps per epoch; counted on from 5
    record = out['history'][-1]
    assert set(record['valid']) == {'mae', 'batch_max'} and record['valid_metric'] == record['valid']['mae']
    x, y = _pairs(32).tensors
    with torch.no_grad(): mae = (resumed.model(x) - y).abs().flatten(1).mean(1).mean().item()
    assert resumed.evaluate(_pairs(32)) == pytest.approx(mae, rel=1e-5)
    assert resumed.evaluate(_pairs(32), 'batch_max') > mae
    with pytest.raises(KeyError, match="metric='rmse' is not one of 'batch_max', 'mae'"):
        resumed.evaluate(_pairs(32), 'rmse')


def test_a_task_that_returns_no_loss_dict_is_named():
    class Bare(CountingTask):
        def loss(self, model, batch): return super().loss(model, batch)['loss']
    with pytest.raises(TypeError, match="Bare.loss must return a dict with the scalar 'loss'"):
        Trainer(nn.Conv1d(1, 1, 1), _pairs(), None, TrainConfig(epochs=1, batch_size=16, device='cpu', progress=False), Bare()).fit()
    with pytest.raises(TypeError, match='task must be a physnb.train.trainer.Task'):
        Trainer(nn.Conv1d(1, 1, 1), _pairs(), None, TrainConfig(device='cpu'), lambda m, b: 0)
