"""The fine-tuning study: the user's papermill command exactly as documented, its parameter checks, and the library it calls."""
from __future__ import annotations
import json, os, shutil, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from physnb.models.processor import Processor, ProcessorConfig, DynamicsModel, apply_freeze, FREEZE_TIERS
from physnb.models.tokeniser import Tokeniser, TokeniserConfig
from physnb.results import read_results

ROOT = Path(__file__).resolve().parents[1]
PAPERMILL = str(Path(sys.executable).with_name('papermill'))
torch.set_num_threads(1)


def checkout(tmp_path) -> Path:
    "A bare copy of the repository's notebooks and project file: runs/ lands there, not in the real checkout."
    repo = tmp_path / 'repo'
    shutil.copytree(ROOT / 'nbs', repo / 'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
    shutil.copy(ROOT / 'pyproject.toml', repo)
    return repo


def run(cmd, cwd, timeout=600):
    env = dict(os.environ, PHYSNB_PROGRESS='0', OMP_NUM_THREADS='1')
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_users_command_from_the_repository_root(tmp_path):
    "`papermill nbs/05_finetune.ipynb -p freeze mostly`, exactly: the executed notebook goes to stdout, results to runs/."
    repo = checkout(tmp_path)
    p = run([PAPERMILL, 'nbs/05_finetune.ipynb', '-p', 'freeze', 'mostly'], repo)
    assert p.returncode == 0, p.stderr[-3000:]
    executed = json.loads(p.stdout)                                   # the executed notebook, on stdout
    assert executed['cells'] and executed['metadata']['papermill']['parameters'] == {'freeze': 'mostly'}
    r = read_results(repo / 'runs' / 'finetune')
    assert r['experiment'] == 'finetune' and r['parameters']['freeze'] == 'mostly' and r['parameters']['source'] == 'in_domain'
    m = r['metrics']
    assert set(m['one_step']) == {'energy', 'density', 'pressure', 'momentum_x', 'momentum_y', 'all'}
    assert len(m['rollout']['all']) == r['parameters']['horizon'] and m['curve'][-1]['step'] == r['parameters']['steps']
    assert all(0 < c['vrmse'] < float('inf') for c in m['curve']) and all(0 < v < float('inf') for v in m['rollout']['all'])
    assert m['parameters_count']['tokeniser_trainable'] < m['parameters_count']['tokeniser_frozen']   # mostly frozen
    for name in ('curve', 'rollout'): assert (repo / 'runs' / 'finetune' / f'{name}.html').stat().st_size > 1000


def test_from_nbs_with_an_output_path_and_other_arms(tmp_path):
    repo = checkout(tmp_path)
    for source, freeze in (('scratch', 'none'), ('out_of_domain', 'full')):
        out = f'runs/ft_{source}'
        p = run([PAPERMILL, '05_finetune.ipynb', str(tmp_path / f'{source}.ipynb'), '--cwd', '.', '-p', 'source', source,
                 '-p', 'freeze', freeze, '-p', 'steps', '4', '-p', 'pretrain_steps', '4', '-p', 'eval_every', '2',
                 '-p', 'res', '16', '-p', 'n_traj', '6', '-p', 'out_dir', out], repo / 'nbs')
        assert p.returncode == 0, p.stderr[-3000:]
        r = read_results(repo / out)
        assert r['parameters']['source'] == source and [c['step'] for c in r['metrics']['curve']] == [1, 2, 4]
    assert r['metrics']['parameters_count']['tokeniser_trainable'] == 0            # full: nothing of the tokeniser trains
    assert set(r['metrics']['tokeniser']['pretrained_on']) == {'gray_scott', 'ns2d', 'shallow_water', 'acoustics'}


@pytest.mark.parametrize('args,message', [(['-p', 'freeze', 'sometimes'], "freeze='sometimes' is not one of 'none', 'mostly', 'full'"),
                                          (['-p', 'source', 'pretrained'], "'scratch', 'in_domain', 'out_of_domain'"),
                                          (['-p', 'compression', '8x2', '-p', 'horizon', '5'], 'horizon=5 must be a positive multiple'),
                                          (['-p', 'frezee', 'mostly'], 'frezee')])
def test_bad_parameters_fail_at_once_and_write_nothing(tmp_path, args, message):
    repo = checkout(tmp_path)
    tic = time.perf_counter()
    p = run([PAPERMILL, 'nbs/05_finetune.ipynb', str(tmp_path / 'out.ipynb'), *args], repo)
    assert p.returncode != 0 and message in p.stderr + p.stdout
    assert not (repo / 'runs' / 'data').exists() and not (repo / 'runs' / 'finetune').exists()
    assert time.perf_counter() - tic < 60


def test_freeze_tiers_train_what_they_say():
    tok = Tokeniser(TokeniserConfig(field_names=['density', 'energy'], width=16, latent=4))
    model = DynamicsModel(tok, Processor(ProcessorConfig(latent=4, dim=16, depth=1, heads=2)), (8, 1))
    x = torch.randn(2, 4, 2, 16, 16)
    for freeze in FREEZE_TIERS:
        apply_freeze(tok, freeze)
        model.zero_grad(set_to_none=True)
        torch.nn.init.normal_(model.processor.head.weight, std=0.1)
        model(x[:, :-1], ['density', 'energy']).pow(2).mean().backward()
        got = {name for name, p in tok.named_parameters() if p.grad is not None}
        trunk = {name for name, p in tok.named_parameters() if 'norm' not in name and not name.startswith('field_')}
        if freeze == 'full': assert not got
        if freeze == 'mostly': assert got and not got & trunk and {'field_in', 'field_out', 'field_out_bias'} <= got
        if freeze == 'none': assert trunk <= got
        assert all(p.grad is not None for p in model.processor.parameters())


def test_processor_is_causal_in_time_and_rollouts_have_any_length():
    tok = Tokeniser(TokeniserConfig(field_names=['density'], width=16, latent=4))
    proc = Processor(ProcessorConfig(latent=4, dim=16, depth=2, heads=2))
    torch.nn.init.normal_(proc.head.weight, std=0.2)
    model = DynamicsModel(tok, proc, (8, 2), max_context=3)
    x = torch.randn(1, 4, 1, 16, 16)
    long = model.rollout(x, ['density'], steps=7)
    assert long.shape == (1, 14, 1, 16, 16) and torch.isfinite(long).all()
    short = model.rollout(x, ['density'], steps=2)
    torch.testing.assert_close(long[:, :4], short)                    # a longer rollout begins with the shorter one


def test_cli_finetune(tmp_path, capsys):
    from physnb.cli import main
    assert main(['finetune', '--source', 'scratch', '--freeze', 'none', '--steps', '2', '--res', '16', '--n-traj', '4',
                 '--out-dir', str(tmp_path / 'ft'), '--data-root', str(tmp_path / 'data'), '--device', 'cpu']) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed['results'] == str(tmp_path / 'ft' / 'results.json') and 'all' in printed['one_step']
    assert main(['finetune', '--freeze', 'partly', '--out-dir', str(tmp_path / 'bad')]) == 2
    assert "freeze='partly' is not one of 'none', 'mostly', 'full'" in capsys.readouterr().err
    assert not (tmp_path / 'bad').exists()


@pytest.mark.slow
def test_ddp_under_torchrun_matches_one_process(tmp_path):
    "2 gloo ranks (4 windows each) train the dynamics model (in-domain tokeniser pretrained under DDP too) to the weights of one process."
    import subprocess, sys
    from _launch import torchrun
    from physnb.core import load_checkpoint
    args = ['finetune', '--source', 'in_domain', '--freeze', 'mostly', '--steps', '3', '--pretrain-steps', '2', '--res', '16',
            '--n-traj', '12', '--batch-size', '8', '--eval-every', '2', '--device', 'cpu']
    env = dict(os.environ, OMP_NUM_THREADS='1', PHYSNB_PROGRESS='0')
    runs = {}
    for name, launcher in (('one', [sys.executable]), ('two', torchrun())):
        r = subprocess.run(launcher + ['-m', 'physnb.cli', *args, '--out-dir', str(tmp_path / name), '--data-root', str(tmp_path / f'data_{name}')],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        if name == 'two' and r.returncode != 0 and 'physnb' not in r.stderr: pytest.skip(f'torchrun could not start: {r.stderr[-500:]}')
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / 'results.json').read_text())['metrics']
    w1, w2 = (load_checkpoint(tmp_path / n / 'checkpoints' / 'last.safetensors')['model'] for n in ('one', 'two'))
    assert w1.keys() == w2.keys()
    for key, tensor in w1.items(): torch.testing.assert_close(w2[key], tensor, rtol=1e-3, atol=1e-4, msg=key)   # all-reduce order
    for a, b in zip(runs['one']['curve'], runs['two']['curve']): assert a['vrmse'] == pytest.approx(b['vrmse'], rel=1e-3)
    assert [p.name for p in (tmp_path / 'two').iterdir() if p.name.startswith('.')] == []     # no temporary files left


def test_the_notebook_trains_under_torchrun_with_one_parameter(tmp_path):
    "`-p nproc 2`: two gloo processes train and checkpoint; the kernel evaluates that run; the numbers match one process."
    repo = checkout(tmp_path)
    tiny = ['-p', 'steps', '3', '-p', 'pretrain_steps', '2', '-p', 'res', '16', '-p', 'n_traj', '12', '-p', 'eval_every', '2']
    curves = {}
    for nproc in (1, 2):
        out = f'runs/ft_{nproc}'
        p = run([PAPERMILL, 'nbs/05_finetune.ipynb', str(tmp_path / f'{nproc}.ipynb'), '--log-output', *tiny, '-p', 'nproc', str(nproc),
                 '-p', 'out_dir', out, '-p', 'data_root', f'runs/data_{nproc}'], repo)
        assert p.returncode == 0, p.stderr[-3000:]
        assert ('"one_step"' in p.stderr) == (nproc == 2), p.stderr[-2000:]   # rank 0's JSON result: torchrun ran only with nproc 2
        curves[nproc] = read_results(repo / out)['metrics']['curve']
    assert [c['step'] for c in curves[2]] == [1, 2, 3]
    for a, b in zip(curves[1], curves[2]): assert a['vrmse'] == pytest.approx(b['vrmse'], rel=1e-3)
