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
    assert set(results['ood']) == {'ood_e2.5_7.5', 'ood_e5_10', 'ood_e10_20'}
    assert set(results['mixture']) == {'poisson', 'advection_diffusion', 'helmholtz'}
    assert all(_finite(r['scratch'] + r['finetune']) for r in results['mixture'].values())
    assert results['pretrain']['mixture']['n_train'] == 3 * TINY['n_pretrain']
    # the datasets are Well files that physnb.data accepts
    from physnb.data.well import check_well_file
    files = sorted((out_dir / 'data').rglob('*.hdf5'))
    assert len(files) == 3 * 2 + 6 * 3   # 3 pretraining sets (train, valid), 6 downstream tasks (train, valid, test)
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


def test_the_paper_recipe_runs_under_papermill(tmp_path):
    "-p recipe paper: epochs per run, a learning rate chosen per n from the grid, λ from the lookup table, uniform init."
    out_dir, results = _run(tmp_path, recipe='paper', study='curves,ood', operator='advection_diffusion', ood_splits='ood_psi1_2')
    assert results['parameters']['recipe'] == 'paper' and results['parameters']['protocol']['budget'] == 'epochs'
    for curve in (results['curves'], results['ood']['ood_psi1_2']):
        assert set(curve['scratch_lr'] + curve['finetune_lr']) <= {1e-5, 5e-5, 1e-4, 5e-4, 1e-3}
        assert _finite(curve['scratch'] + curve['finetune'])
    assert sorted(p.name for p in (out_dir / 'data').iterdir() if not p.name.startswith('.')) == [
        'advection_diffusion_lookup_id_16px_8-8-8', 'advection_diffusion_lookup_ood_psi1_2_16px_8-8-8',
        'advection_diffusion_lookup_pretrain_16px_16-8-0']
    with pytest.raises(papermill.PapermillExecutionError, match="recipe choice init='xavier' is not one of 'uniform', 'normal'"):
        _run(tmp_path, recipe='paper', recipe_overrides='init:xavier')


def _table(notebook: str, header: str) -> list[list[str]]:
    "The rows of the markdown table whose header starts with `header`, as lists of cells."
    for cell in json.loads((ROOT / 'nbs' / notebook).read_text())['cells']:
        lines = ''.join(cell['source']).splitlines()
        for i, line in enumerate(lines):
            if line.startswith(header):
                rows = []
                for row in lines[i + 2:]:
                    if not row.startswith('|'): break
                    rows.append([c.strip() for c in row.strip('|').split('|')])
                return rows
    raise AssertionError(f'{notebook}: no table starting {header!r}')


def _code(cell: str) -> str:
    return cell.split('`')[1] if '`' in cell else ''


def test_the_differences_tables_state_the_recipes_values():
    "The recipe tables in 06a and 07 say what RECIPES holds: the 'paper' preset is the listed protocol."
    from physnb.train.transfer import RECIPES
    rows = _table('06a_train.transfer.ipynb', '| choice |')
    assert {_code(r[0]) for r in rows} == set(RECIPES['paper'])
    for choice, paper, kit, _ in rows:
        for text, preset in ((paper, 'paper'), (kit, 'kit')):
            assert _code(text) == str(RECIPES[preset][_code(choice)]), (choice, preset, text)
    keys = {'downstream budget': 'budget', 'spectral init': 'init', 'advection–diffusion λ': 'advection_weight',
            'input scaler': 'scaler', 'subsets': 'subsample'}
    rows = {r[0]: r for r in _table('07_fno_transfer.ipynb', '| what | paper |')}
    for what, key in keys.items():
        assert _code(rows[what][1]) == RECIPES['paper'][key] and _code(rows[what][2]) == RECIPES['kit'][key], what
    assert '1e-5, 5e-5, 1e-4, 5e-4, 1e-3' in rows['learning rate'][1] and RECIPES['paper']['lr_grid'] == (1e-5, 5e-5, 1e-4, 5e-4, 1e-3)
