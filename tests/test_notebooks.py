"""House rules for the notebooks that nbdev-test itself cannot check."""
import json, re
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parents[1] / 'nbs'
NOTEBOOKS = sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith('_'))
# experiment notebooks define no module (no `#| default_exp`); each must keep its papermill `parameters` tag
# reading notebooks (the index, the tutorials) define no module and take no parameters; they are named so
READING = [p for p in NOTEBOOKS if re.match(r'^(00_index|t\d_[a-z0-9_]+)\.ipynb$', p.name)]
EXPERIMENTS = [p for p in NOTEBOOKS if p not in READING
               and not ''.join(json.loads(p.read_text())['cells'][0]['source']).startswith('#| default_exp')]
PARAMETRISED = EXPERIMENTS   # every papermill target is a module-free experiment notebook

def cells(p): return json.loads(p.read_text())['cells']

def test_there_are_numbered_notebooks():
    assert NOTEBOOKS and all(re.match(r'^\d\d[a-z]?_[a-z_]+(\.[a-z_]+)?\.ipynb$', p.name) or p in READING for p in NOTEBOOKS), [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize('nb', READING, ids=lambda p: p.name)
def test_reading_notebooks_define_nothing_and_take_no_parameters(nb):
    for c in cells(nb):
        src = ''.join(c['source'])
        assert not re.search(r'^#\|\s*(default_exp|export)', src, re.M), f'{nb.name}: a reading notebook defines no module'
        assert 'parameters' not in c['metadata'].get('tags', []), f'{nb.name}: a reading notebook takes no parameters'

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_title_and_summary(nb):
    cs = cells(nb)
    md = next(c for c in cs if c['cell_type'] == 'markdown')
    text = ''.join(md['source'])
    assert re.search(r'^# \S', text, re.M), f'{nb.name}: first markdown cell needs an H1'
    assert re.search(r'^> \S', text, re.M), f'{nb.name}: first markdown cell needs a one-line > summary'
    if nb not in EXPERIMENTS and nb not in READING:
        assert ''.join(cs[0]['source']).startswith('#| default_exp'), f'{nb.name}: first cell must be #| default_exp'

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(nb):
    for c in cells(nb):
        if c['cell_type'] == 'code':
            assert not c.get('outputs') and c.get('execution_count') is None, f'{nb.name}: run nbdev-clean (outputs left in)'

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_nbdev_export_cell_is_skipped_by_papermill(nb):
    for c in cells(nb):
        if c['cell_type'] == 'code' and 'nbdev_export(' in ''.join(c['source']):
            assert 'skip-execution' in c['metadata'].get('tags', []), f'{nb.name}: tag the nbdev_export() cell skip-execution'

@pytest.mark.parametrize('nb', PARAMETRISED or [None], ids=lambda p: getattr(p, 'name', 'none'))
def test_experiment_parameters_are_typed_and_commented(nb):
    if nb is None: pytest.skip('no experiment notebooks yet')
    ps = [c for c in cells(nb) if 'parameters' in c['metadata'].get('tags', [])]
    assert len(ps) == 1, f'{nb.name}: exactly one parameters cell'
    for line in ''.join(ps[0]['source']).splitlines():
        if line.strip() and not line.lstrip().startswith('#'):
            assert re.match(r'^\w+\s*:\s*[\w\[\], |]+\s*=.+#\s*\S', line), f'{nb.name}: parameter line needs a type and a comment: {line!r}'

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_at_most_one_parameters_cell(nb):
    ps = [c for c in cells(nb) if 'parameters' in c['metadata'].get('tags', [])]
    assert len(ps) <= 1, f'{nb.name}: {len(ps)} cells tagged parameters; papermill injects after the first only'


@pytest.mark.parametrize('nb', [p for p in NOTEBOOKS if p not in PARAMETRISED], ids=lambda p: p.name)
def test_library_notebooks_carry_no_papermill_parameters(nb):
    "Library notebooks define and demonstrate with fixed constants; experiments live in module-free notebooks."
    assert not [c for c in cells(nb) if 'parameters' in c['metadata'].get('tags', [])], f'{nb.name}: move the experiment out'


@pytest.mark.parametrize('nb', EXPERIMENTS, ids=lambda p: p.name)
def test_experiments_refuse_unknown_parameters(nb):
    "papermill injects a misspelt -p as a new variable; every experiment checks its names with experiment_parameters."
    code = '\n'.join(''.join(c['source']) for c in cells(nb) if c['cell_type'] == 'code')
    assert re.search(r'experiment_parameters\((?:\s*#[^\n]*)?\s*globals\(\), _before', code) and '_before = set(globals())' in code, nb.name


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_a_class_built_across_cells_stays_in_one_section(nb):
    "Methods added with @patch sit in the same `##` section as their class (subsections may split it for the prose)."
    section, home, seen = None, {}, {}
    for c in cells(nb):
        s = ''.join(c['source'])
        if c['cell_type'] == 'markdown':
            section = next((l for l in s.splitlines() if l.startswith('## ')), section)
        elif s.startswith('#| export'):
            for m in re.finditer(r'^class (\w+)', s, re.M): home[m.group(1)] = section
            for m in re.finditer(r'^def \w+\(self: (\w+)', s, re.M): seen.setdefault(m.group(1), set()).add(section)
    for cls, sections in seen.items():
        if cls in home: assert sections == {home[cls]}, f'{nb.name}: {cls} is built in {sorted(map(str, sections | {home[cls]}))}'
