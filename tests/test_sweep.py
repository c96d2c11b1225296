"""The sweep runner end to end: a 2-axis sweep from the command line, failure isolation, resume after a killed
runner, a clean stop on Ctrl-C (no kernel left), the submitit path (its local executor), and the checks that
fail before anything is launched."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import nbformat
import pytest

from physnb.sweep import Sweep, read_status, read_sweep

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / 'physnb'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PHYSNB_PROGRESS': '0'}


def physnb(*args, **kw):
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=600, **kw)


@pytest.fixture
def toy(tmp_path):
    "A notebook with the experiments' convention: a parameters cell, out_dir, results.json; it can fail or dawdle on request."
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("scale: float = 1.0  # a number\nseed: int = 0  # a seed\nfail: bool = False  # fail on purpose\n"
                                  "sleep: float = 0.0  # seconds to dawdle\nout_dir: str = 'runs/toy'  # results", metadata={'tags': ['parameters']}),
        nbformat.v4.new_code_cell("import time\nfrom physnb.results import write_results\ntime.sleep(sleep)\n"
                                  "if fail: raise RuntimeError(f'failing on purpose at scale={scale}')\n"
                                  "write_results(out_dir, 'toy', dict(scale=scale, seed=seed), dict(loss=scale ** 2 + seed / 10), seed)")])
    nb.metadata['kernelspec'] = dict(name='python3', display_name='Python 3', language='python')
    path = tmp_path / 'toy.ipynb'; nbformat.write(nb, path)
    return path


def kernels() -> set[int]:
    "PIDs of running ipykernel processes."
    out = subprocess.run(['pgrep', '-f', 'ipykernel_launcher'], capture_output=True, text=True).stdout.split()
    return {int(p) for p in out}


def test_a_two_axis_sweep_of_an_experiment_notebook_from_the_command_line(tmp_path):
    out = tmp_path / 'sweep'
    r = physnb('sweep', ROOT / 'nbs' / '05_finetune.ipynb', '-p', 'freeze', 'none,mostly', '-p', 'seed', '0,1',
               '--fixed', 'steps=2', 'pretrain_steps=2', 'eval_every=1', 'n_traj=3', f'data_root={tmp_path / "data"}',
               '--out', out, '--jobs', 2, '--threads', 1, '--metric', 'final_valid_vrmse', '--x', 'freeze')
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary['states'] == {'done': 4} and Path(summary['figure']).is_file()
    rows = read_sweep(out, as_frame=False)
    assert [(row['freeze'], row['seed']) for row in rows] == [('none', '0'), ('none', '1'), ('mostly', '0'), ('mostly', '1')]
    assert all(float(row['final_valid_vrmse']) > 0 for row in rows)
    html = Path(summary['figure']).read_text()
    assert 'final_valid_vrmse' in html and 'src="https://cdn.plot.ly' not in html   # offline figure
    point = out / rows[0]['point']
    assert {'notebook.ipynb', 'log.txt', 'status.json', 'results.json', 'parameters.yaml'} <= {p.name for p in point.iterdir()}


def test_a_failed_point_is_recorded_and_the_others_finish(toy, tmp_path):
    out = tmp_path / 'sweep'
    r = physnb('sweep', toy, '-p', 'scale', '1,2', '--grid', _grid(tmp_path, points=[dict(scale=3.0, fail=True)]), '--out', out, '--jobs', 2)
    assert r.returncode == 1, r.stderr
    summary = json.loads(r.stdout)
    assert summary['states'] == {'done': 2, 'failed': 1}
    (name, error), = summary['failed'].items()
    assert 'failing on purpose at scale=3.0' in error
    status = read_status(out / name)
    assert status['state'] == 'failed' and 'RuntimeError' in status['log_tail']
    # a re-run skips what is done and, asked to, runs the failed point again (it fails again, nothing else runs)
    before = {p: read_status(out / p)['started'] for p in summary['failed'] | {n: 0 for n in _names(out)}}
    r = physnb('sweep', toy, '-p', 'scale', '1,2', '--grid', _grid(tmp_path, points=[dict(scale=3.0, fail=True)]), '--out', out,
               '--retry-failed')
    after = {p: read_status(out / p)['started'] for p in before}
    assert r.returncode == 1 and [p for p in before if before[p] != after[p]] == [name]


def _grid(tmp_path, **spec):
    p = tmp_path / 'grid.yaml'; p.write_text(json.dumps(spec)); return p     # JSON is YAML


def _names(out):
    return [p.name for p in sorted(out.iterdir()) if (p / 'status.json').exists()]


def test_a_killed_runner_resumes_without_redoing_finished_points(toy, tmp_path):
    out = tmp_path / 'sweep'
    args = [str(EXE), 'sweep', str(toy), '-p', 'sleep', '0,60', '--out', str(out), '--jobs', 2]
    runner = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    for _ in range(600):                     # wait until the quick point is done and the slow one runs
        states = {n: (read_status(out / n) or {}).get('state') for n in ('sleep-0.0', 'sleep-60.0')}
        if states == {'sleep-0.0': 'done', 'sleep-60.0': 'running'} and read_status(out / 'sleep-60.0').get('pid'): break
        time.sleep(0.2)
    else: pytest.fail(f'the sweep did not get going: {states}')
    runner.kill(); runner.wait()             # kill -9: the slow point's papermill goes on, orphaned
    orphan = read_status(out / 'sleep-60.0')['pid']
    done_at = read_status(out / 'sleep-0.0')['finished']
    sweep = Sweep(toy, out, axes=dict(sleep=['0', '60']), jobs=2)
    assert [sweep.names[i] for i in sweep.todo()] == ['sleep-60.0']
    # resume with the slow point made quick through a fixed value would be another sweep: refused
    r = physnb('sweep', toy, '-p', 'sleep', '0,60', '--fixed', 'scale=2', '--out', out)
    assert r.returncode == 2 and 'holds a different sweep' in r.stderr
    # the same sweep again: the orphan is stopped, only the unfinished point runs (interrupt it after it starts anew)
    runner = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    for _ in range(300):
        s = read_status(out / 'sleep-60.0')
        if s and s.get('pid') not in (None, orphan) and s['state'] == 'running': break
        time.sleep(0.2)
    else: pytest.fail('the unfinished point was not started again')
    assert not Path(f'/proc/{orphan}').exists() or b'zombie' in Path(f'/proc/{orphan}/status').read_bytes().lower()
    assert read_status(out / 'sleep-0.0')['finished'] == done_at          # the finished point was not redone
    runner.send_signal(signal.SIGINT)        # Ctrl-C: the running point is interrupted, its kernel shut down
    _, err = runner.communicate(timeout=120)
    assert runner.returncode == 130, err[-2000:]
    assert read_status(out / 'sleep-60.0')['state'] == 'interrupted'
    time.sleep(2)
    mine = [p for p in kernels() if str(out) in Path(f'/proc/{p}/cmdline').read_bytes().decode(errors='replace')
            or _environ_mentions(p, str(out))]
    assert not mine, f'kernels left behind: {mine}'


def _environ_mentions(pid, text):
    try: return text.encode() in Path(f'/proc/{pid}/environ').read_bytes()
    except OSError: return False


def test_the_submitit_path_with_its_local_executor(toy, tmp_path):
    pytest.importorskip('submitit')
    sweep = Sweep(toy, tmp_path / 'sweep', axes=dict(scale=['1', '2']), points=[dict(scale=5.0, fail=True)], threads=1)
    rows = sweep.submit(cluster='local', timeout_min=10)
    assert [r['state'] for r in rows] == ['done', 'done', 'failed'] and rows[1]['loss'] == 4.0
    assert 'failing on purpose' in rows[2]['error']
    assert sweep.todo() == [] and sweep.todo(retry_failed=True) == [2]


@pytest.mark.parametrize('args,message', [
    (('-p', 'sacle', '1,2'), "unknown parameter(s) 'sacle': notebook toy.ipynb's parameters are scale (float), seed (int), fail (bool), sleep (float), out_dir (str)"),
    (('-p', 'seed', 'one,two'), "parameter seed='one' must be of type int"),
    (('-p', 'seed', '0,1', '--fixed', 'fail=maybe'), "parameter fail='maybe' must be of type bool"),
    ((), 'the grid expands to nothing'),
    (('-p', 'seed', '0,1', '--devices', 'cuda:7'), "cuda:7"),
    (('-p', 'seed', '0,1', '--jobs', 0), 'jobs=0 must be an int >= 1'),
    (('-p', 'out_dir', 'a,b'), "the grid sets 'out_dir'"),
])
def test_bad_sweeps_fail_before_anything_is_launched(toy, tmp_path, args, message):
    r = physnb('sweep', toy, *args, '--out', tmp_path / 'sweep')
    assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path / 'sweep').exists()


def test_a_folder_holding_something_else_is_refused(toy, tmp_path):
    (tmp_path / 'mine').mkdir(); (tmp_path / 'mine' / 'thesis.tex').write_text('precious')
    r = physnb('sweep', toy, '-p', 'seed', '0,1', '--out', tmp_path / 'mine')
    assert r.returncode == 2 and 'holds files but no sweep.json' in r.stderr
    assert [p.name for p in (tmp_path / 'mine').iterdir()] == ['thesis.tex']
