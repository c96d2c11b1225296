"""Every experiment notebook checks its papermill parameters in the cell after `parameters`, before any work:
an undeclared name, a value of the wrong type, a value not allowed or out of range fails with a message that
names it, and nothing is written under `out_dir`."""
import ast
import json
import os
from pathlib import Path

import pytest

papermill = pytest.importorskip('papermill')

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ('04_pretrain', '05_finetune', '07_fno_transfer', '09b_lejepa_study')


def _declared(name: str) -> dict[str, str]:
    "The parameters cell's annotated names and their types, read with Python's own parser."
    cells = json.loads((ROOT / 'nbs' / f'{name}.ipynb').read_text())['cells']
    cell = next(c for c in cells if 'parameters' in c.get('metadata', {}).get('tags', []))
    tree = ast.parse(''.join(cell['source']))
    return {n.target.id: ast.unparse(n.annotation) for n in tree.body if isinstance(n, ast.AnnAssign)}


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_papermill_sees_every_declared_parameter(name):
    "papermill's own parser (`papermill --help-notebook`, the sweep runner) reads every parameter with its type."
    declared = _declared(name)
    assert declared and set(declared.values()) <= {'int', 'float', 'str', 'bool'}, declared
    seen = papermill.inspect_notebook(str(ROOT / 'nbs' / f'{name}.ipynb'))
    assert {k: v['inferred_type_name'] for k, v in seen.items()} == declared


CASES = [   # notebook, parameters, the message (a regular expression)
    ('04_pretrain', dict(not_a_param=1), r"unknown parameter\(s\) 'not_a_param'.*parameters are source \(str\), target \(str\)"),
    ('05_finetune', dict(not_a_param=1), r"unknown parameter\(s\) 'not_a_param'.*freeze \(str\).*steps \(int\)"),
    ('07_fno_transfer', dict(not_a_param=1), r"unknown parameter\(s\) 'not_a_param'.*modes \(int\)"),
    ('09b_lejepa_study', dict(not_a_param=1), r"unknown parameter\(s\) 'not_a_param'.*lam \(float\)"),
    ('05_finetune', dict(res='abc'), r"parameter res='abc' must be of type int"),
    ('05_finetune', dict(lr='fast'), r"parameter lr='fast' must be of type float"),
    ('05_finetune', dict(tokeniser=5), r"tokeniser=5 must be of type str .*-r name value passes text"),
    ('07_fno_transfer', dict(size_grid='8by4'), r"size_grid='8by4' is not a comma list of width x modes pairs"),
    ('05_finetune', dict(system='bogus'), r"system='bogus' is not one of 'gray_scott', .*'euler'"),
    ('05_finetune', dict(freeze='bogus'), r"freeze='bogus' is not one of 'none', 'mostly', 'full'"),
    ('09b_lejepa_study', dict(system='bogus'), r"system='bogus' is not one of 'gray_scott'"),
    ('05_finetune', dict(n_traj=2), r"parameter n_traj=2 must be >= 3"),
    ('09b_lejepa_study', dict(n_traj=2), r"parameter n_traj=2 must be >= 3"),
    ('07_fno_transfer', dict(modes=40), r"modes=\(40, 40\) do not fit a 32x32 grid"),
    ('07_fno_transfer', dict(n_test=0), r"parameter n_test=0 must be >= 1"),
    ('07_fno_transfer', dict(ood_splits='bogus'), r"\['bogus'\] not among poisson's shifted splits"),
    ('07_fno_transfer', dict(lr=0.0), r"parameter lr=0.0 must be > 0"),
    ('04_pretrain', dict(compression_levels='4x1,3x3'), r"level 3x3 does not fit windows of \(T, H, W\)=\(8, 32, 32\)"),
    ('05_finetune', dict(heads=3), r"dim=32 must split into heads=3"),
    ('09b_lejepa_study', dict(steps=2), r"steps=2 saves 3 frames per trajectory, fewer than window=4"),
    ('09b_lejepa_study', dict(sweep_size=50), r"sweep_size=50 must be <= 20"),
]


@pytest.mark.parametrize('name,parameters,message', CASES, ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CASES])
def test_a_bad_parameter_fails_before_any_work(tmp_path, name, parameters, message):
    os.environ['PHYSNB_PROGRESS'] = '0'
    out_dir = tmp_path / 'run'
    with pytest.raises(papermill.PapermillExecutionError, match=message):
        papermill.execute_notebook(str(ROOT / 'nbs' / f'{name}.ipynb'), str(tmp_path / 'executed.ipynb'), cwd=str(ROOT),
                                   parameters={'out_dir': str(out_dir), **parameters}, progress_bar=False, kernel_name='python3')
    assert not out_dir.exists() or not any(out_dir.rglob('*')), sorted(out_dir.rglob('*'))    # nothing generated or written
