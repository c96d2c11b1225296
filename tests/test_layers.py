"""The library's layers: every module imports only from its own layer or the layers below it.

core → sim → data → models → train → studies → viz → cli. The graph is read from the source with `ast`
(every `import` anywhere in a module, including those inside functions), so a lazy import of a higher layer
counts too. Solver and model modules must not import plotly.
"""
import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / 'physnb'
LAYERS = ['core', 'sim', 'data', 'models', 'train', 'studies', 'viz', 'cli']
RANK = {name: i for i, name in enumerate(LAYERS)}
TOP_LEVEL = {'core': 'core', 'metrics': 'core', 'results': 'core', 'sweep': 'studies', 'cli': 'cli'}   # modules that are not in a subpackage


def module_name(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def layer(module: str) -> str:
    "Layer of a physnb module name ('physnb.data.well' -> 'data', 'physnb.metrics' -> 'core')."
    part = module.split('.')[1]
    if part in TOP_LEVEL: return TOP_LEVEL[part]
    if part in RANK: return part
    raise ValueError(f'{module}: not in a known layer; add it to LAYERS or TOP_LEVEL in {__file__}')


def physnb_imports(path: Path) -> set[str]:
    "Every physnb module `path` imports, absolute or relative, at any depth of the file."
    return imports_in(path.read_text(), module_name(path), path.name == '__init__.py')


def imports_in(source: str, me: str, is_package: bool = False) -> set[str]:
    package = me if is_package else me.rsplit('.', 1)[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split('.')[0] == 'physnb'}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')[:len(package.split('.')) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else: target = node.module or ''
            if target.split('.')[0] != 'physnb': continue
            if target == 'physnb' or (node.level and not node.module):   # from . import x / from physnb import x
                out |= {f'{target}.{a.name}' for a in node.names}
            else: out.add(target)
    return out


def third_party(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import): names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module: names.add(node.module.split('.')[0])
    return names


MODULES = sorted(p for p in LIB.rglob('*.py') if p.name != '_modidx.py' and p != LIB / '__init__.py')


def test_every_module_is_in_a_layer():
    assert len(MODULES) > 20
    for p in MODULES:
        layer(module_name(p))   # raises for a module outside the known layers


@pytest.mark.parametrize('path', MODULES, ids=lambda p: module_name(p))
def test_imports_point_down_the_layers(path):
    me = module_name(path)
    if me == 'physnb': return
    up = [(m, layer(m)) for m in physnb_imports(path) if m != 'physnb' and RANK[layer(m)] > RANK[layer(me)]]
    assert not up, f'{me} (layer {layer(me)}) imports from higher layers: {up}'


@pytest.mark.parametrize('path', [p for p in MODULES if module_name(p).split('.')[1] in ('core', 'metrics', 'sim', 'data', 'models')],
                         ids=lambda p: module_name(p))
def test_solver_data_and_model_modules_do_not_import_plotly_or_widgets(path):
    assert not {'plotly', 'ipywidgets', 'anywidget'} & third_party(path), f'{module_name(path)} imports a plotting library'


def test_the_reader_sees_relative_lazy_and_package_imports():
    "What the layer test relies on: relative imports resolve, imports inside functions count, `from physnb import x`."
    src = "from ..core import x\nfrom . import pdes\ndef f():\n    from ..train.trainer import Trainer\n    from physnb import cli\n"
    assert imports_in(src, 'physnb.sim.waves') == {'physnb.core', 'physnb.sim.pdes', 'physnb.train.trainer', 'physnb.cli'}
    assert RANK[layer('physnb.train.trainer')] > RANK[layer('physnb.sim.waves')]   # so a solver importing it fails


def test_importing_any_module_but_the_views_loads_no_plotting_library():
    "Plotly is imported inside the functions that draw; `import physnb.cli` (every driver) stays light."
    import subprocess, sys
    mods = [module_name(p) for p in MODULES if layer(module_name(p)) != 'viz']
    code = (f"import sys, importlib\nfor m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in ('plotly', 'ipywidgets', 'anywidget') if k in sys.modules))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == '[]', out.stdout
