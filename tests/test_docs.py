"""`make docs` (tools/make_docs.py) renders notebooks, run, as static pages whose figures open offline."""
import re, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp('docs')
    r = subprocess.run([sys.executable, str(ROOT / 'tools' / 'make_docs.py'), '00_index', '08a_viz.cramer_wold', '--out', str(out)],
                       capture_output=True, text=True, timeout=600, env={'OMP_NUM_THREADS': '1', 'PATH': str(Path(sys.executable).parent) + ':/usr/bin:/bin'})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_a_notebook_renders_with_its_figures_as_pages_show_them(pages):
    page = (pages / '08a_viz.cramer_wold.html').read_text()
    assert 'plotly.js v' not in page and 'src="https://cdn.plot.ly' not in page           # plotly.js once for all pages, beside them
    assert page.index('src="plotly.min.js"') < page.index('plotly-graph-div') and (pages / 'plotly.min.js').stat().st_size > 1e6
    assert 'widget-state+json' not in page and 'widget-view+json' not in page and 'require.min.js' not in page
    assert '#| hide' not in page and '#| export' not in page and 'nbdev_export' not in page   # as nbdev's pages show a notebook
    cells = page.split('<div class="jp-Cell ')
    explorer = next(c for c in cells if '>projection_explorer<' in c and '>x_points<' in c)   # the widget's cell shows its static figure
    assert 'plotly-graph-div' in explorer and ('statistic vs \\u03b8' in explorer or 'statistic vs θ' in explorer)
    index = (pages / 'index.html').read_text()
    assert re.search(r'href="08a_viz.cramer_wold.html">08a_viz.cramer_wold</a> — [\d.]+ s', index), index
    start = (pages / '00_index.html').read_text()
    assert 'physnb: start here' in start and 'href="t1_one_tokeniser_every_compression.html"' in start and '.ipynb"' not in start


def test_the_pages_draw_their_figures_with_the_network_cut(pages):
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed (pip install playwright)')
    chromium = shutil.which('chromium') or '/usr/bin/chromium'
    if not Path(chromium).exists(): pytest.skip('no chromium at /usr/bin/chromium (apt-get install chromium)')
    errors, asked = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=['--no-sandbox'])
        try:
            page = browser.new_page(viewport=dict(width=1280, height=900))
            page.route(re.compile(r'^https?://'), lambda route: (asked.append(route.request.url), route.abort()))
            page.on('pageerror', lambda e: errors.append(str(e)))
            page.goto((pages / '08a_viz.cramer_wold.html').as_uri())
            page.wait_for_function("document.querySelectorAll('.plotly-graph-div').length > 0 && "
                                   "[...document.querySelectorAll('.plotly-graph-div')].every(d => d.querySelector('.main-svg'))", timeout=30_000)
            assert page.locator('.plotly-graph-div').count() >= 3
            assert page.locator('.plotly-graph-div .scatterlayer .trace').count() > 0        # with data, not empty axes
        finally:
            browser.close()
    assert all('mathjax' in u.lower() for u in asked), asked                            # only MathJax is fetched (formulas, when online)
    assert not errors, errors
