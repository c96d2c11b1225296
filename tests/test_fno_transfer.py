"The FNO transfer experiment notebook runs end to end under papermill and writes a complete results JSON."
import json
import math
import os
from pathlib import Path

import pytest

papermill = pytest.importorskip('papermill')

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'nbs' / '07_fno_transfer.ipynb'
TINY = dict(res=16, n_pretrain=16, n_valid=8, n_test=8, max_log2_n=3, epochs=1, finetune_steps=2, batch_size=8,
            width=8, modes=4, size_grid='4x2,8x4', size_n=8, threads=1)


def _run(tmp_path, **parameters):
    out_dir = tmp_path / 'runs'
    os.environ.setdefault('OMP_NUM_THREADS', '1'); os.environ['PHYSNB_PROGRESS'] = '0'
    papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / 'executed.ipynb'), cwd=str(ROOT / 'nbs'),
                               parameters={**TINY, 'out_dir': str(out_dir), **parameters}, progress_bar=False,
                               kernel_name='python3')
    saved = json.loads((out_dir / 'results.json').read_text())
    assert saved['schema'] == 'physnb.results/1' and saved['experiment'] == 'fno_transfer' and saved['seed'] == 0
    assert saved['figures'] == [name for name in ('curves.html', 'size.html') if (out_dir / name).exists()]
    return out_dir, {**saved['metrics'], 'parameters': saved['parameters'], 'timing': saved['timings']}   # the studies' view


def _finite(values): return all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in values)


def test_all_four_studies_write_finite_errors(tmp_path):
    out_dir, results = _run(tmp_path)
    assert results['parameters']['downstream_sizes'] == [8]
    assert {'curves', 'size', 'ood', 'mixture', 'pretrain', 'timing'} <= set(results)
    curves = results['curves']
    assert curves['n'] == [8] and _finite(curves['scratch'] + curves['finetune'] + [curves['zero_shot']])
    assert [(r['width'], r['modes']) for r in results['size']] == [(4, 2), (8, 4)]
    assert results['size'][0]['parameters'] < results['size'][1]['parameters']
    assert all(_finite([r['scratch'], r['finetune'], r['gain']]) for r in results['size'])
    assert set(results['ood']) == {'ood_e5_10', 'ood_e10_20'}
    assert set(results['mixture']) == {'poisson', 'advection_diffusion', 'helmholtz'}
    assert all(_finite(r['scratch'] + r['finetune']) for r in results['mixture'].values())
    assert results['pretrain']['mixture']['n_train'] == 3 * TINY['n_pretrain']
    # the datasets are Well files that physnb.data accepts
    from physnb.data.well import check_well_file
    files = sorted((out_dir / 'data').rglob('*.hdf5'))
    assert len(files) == 3 * 2 + 5 * 3   # 3 pretraining sets (train, valid), 5 downstream tasks (train, valid, test)
    for f in files: check_well_file(f)
    assert (out_dir / 'curves.html').exists() and (out_dir / 'size.html').exists()


def test_study_selection_and_operator(tmp_path):
    _, results = _run(tmp_path, study='curves', operator='helmholtz')
    assert 'curves' in results and not {'size', 'ood', 'mixture'} & set(results)
    assert results['curves']['operator'] == 'helmholtz'


def test_unknown_study_fails_clearly(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match="'curves', 'size', 'ood', 'mixture'"):
        _run(tmp_path, study='everything')


def test_a_misspelt_parameter_fails_before_any_work(tmp_path):
    "papermill injects an unknown -p name as a new variable; the notebook refuses it, naming the allowed ones."
    with pytest.raises(papermill.PapermillExecutionError, match=r"unknown parameter\(s\) 'epoch'.*epochs \(int\)"):
        _run(tmp_path, epoch=3)
    with pytest.raises(papermill.PapermillExecutionError, match='res=16.5 must be of type int'):
        _run(tmp_path, res=16.5)
    assert not (tmp_path / 'runs').exists()
