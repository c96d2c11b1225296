"""`make docs` (tools/make_docs.py) renders notebooks, run, as static pages whose figures open offline."""
import re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_notebook_renders_with_its_figures_and_widgets(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / 'tools' / 'make_docs.py'), '00_index', '08a_viz.cramer_wold', '--out', str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env={'OMP_NUM_THREADS': '1', 'PATH': str(Path(sys.executable).parent) + ':/usr/bin:/bin'})
    assert r.returncode == 0, r.stderr[-3000:]
    page = (tmp_path / '08a_viz.cramer_wold.html').read_text()
    assert page.count('plotly-graph-div') >= 3 and 'src="https://cdn.plot.ly' not in page
    assert page.index('plotly.js v') < page.index('plotly-graph-div')          # plotly.js comes first: the page opens offline
    assert 'θ (deg)' in page or 'statistic vs θ' in page                          # the projection explorer's static figure
    index = (tmp_path / 'index.html').read_text()
    assert re.search(r'href="08a_viz.cramer_wold.html">08a_viz.cramer_wold</a> — [\d.]+ s', index), index
    assert 'physnb: start here' in (tmp_path / '00_index.html').read_text()
