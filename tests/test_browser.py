"""The widgets in a real JupyterLab 4, driven by headless Chromium through Playwright.

1. A small fixture notebook holds the three widgets (the compression explorer, the rollout scrubber, the
   Cramér–Wold projection explorer) on small random data: each renders (a plot with data, not "Error displaying
   widget" or a bare repr), each control changes the figure (its title, read from the page before and after),
   each figure and legend fits its output area at 1280 px with the file browser open, and after saving and
   reloading the tab with the kernel still running the widgets draw again.
2. The widget notebook 03b itself, run with Run All: each widget draws and its slider redraws it; saved and
   reloaded with the kernel running, all draw again (they did not, issue 15: plotly's 5 MB script in every
   figure's state; see `LightFigureWidget`). Any other notebook is added by a line in the parametrisation.
3. The preview page of `physnb preview`: colour bars, play/pause clear of the slider, no page error when the
   slider is dragged during play.
The browser console must show no errors in any of them. Servers listen on 127.0.0.1 with a random token, in a
temporary folder; server, kernels and browser are stopped at the end.

Needs Debian's chromium (`apt-get install chromium`; .ci/run installs it) and `pip install playwright`; never
`playwright install`. Without them the test skips and says why.
"""
import contextlib, json, os, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed (pip install playwright)')
if not Path(CHROMIUM).exists(): pytest.skip('no chromium at /usr/bin/chromium (apt-get install chromium)', allow_module_level=True)

CELLS = [
    "import torch\ntorch.manual_seed(0)",
    "from physnb.models.tokeniser import Tokeniser, TokeniserConfig\nfrom physnb.viz.widgets import compression_explorer\n"
    "tok = Tokeniser(TokeniserConfig(field_names=['a', 'b'], width=8, latent=4))\n"
    "compression_explorer(tok, torch.randn(2, 8, 2, 32, 32), ['a', 'b'], levels=[(4, 1), (8, 1)])",
    "from physnb.viz.widgets import rollout_scrubber\ntruth = torch.randn(6, 2, 16, 16)\n"
    "rollout_scrubber(truth, truth + 0.1 * torch.randn_like(truth), ['u', 'v'])",
    "from physnb.viz.cramer_wold import projection_explorer, x_distribution\nprojection_explorer(x_distribution(400))",
]
WIDGET = '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output:has(.widget-vbox)'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@contextlib.contextmanager
def jupyterlab(root: Path):
    "JupyterLab on 127.0.0.1 with a random token, serving `root`; stopped (with its kernels) on leaving."
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PHYSNB_PROGRESS': '0', 'JUPYTER_RUNTIME_DIR': str(root / '.runtime'),
           'JUPYTERLAB_WORKSPACES_DIR': str(root / '.workspaces')}
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ip', '127.0.0.1', '--port', str(port),
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}', '--LabApp.news_url=None',
           '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate']
    if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')
    log = open(root / '.lab.log', 'w')
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f'{url}/api/status?token={token}', timeout=1); break
            except OSError: time.sleep(0.1)
        else: raise AssertionError('JupyterLab did not start:\n' + (root / '.lab.log').read_text()[-2000:])
        yield dict(url=url, token=token)
    finally:
        os.killpg(server.pid, signal.SIGTERM)            # the server shuts its kernels down on SIGTERM
        try: server.wait(30)
        except subprocess.TimeoutExpired: os.killpg(server.pid, signal.SIGKILL); server.wait()
        log.close()


@pytest.fixture
def lab(tmp_path):
    "The fixture notebook (three widgets on small random data) served by JupyterLab."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata['kernelspec'] = dict(name='python3', display_name='Python 3', language='python')
    nbformat.write(nb, tmp_path / 'widgets.ipynb')
    with jupyterlab(tmp_path) as server: yield server


@contextlib.contextmanager
def _browser_page(errors: list, height: int = 900):
    "A headless Chromium page 1280 px wide whose console errors and page errors go to `errors`; closed on leaving."
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=['--no-sandbox'])
        try:
            page = browser.new_page(viewport=dict(width=1280, height=height))
            page.on('console', lambda m: errors.append(m.text) if m.type == 'error' else None)
            page.on('pageerror', lambda e: errors.append(f'page error: {e}'))
            yield page
        finally:
            browser.close()


def _wait_idle(page, timeout=120):
    "Until no cell is queued or running and the kernel status reads Idle twice in a row."
    deadline, calm = time.time() + timeout, 0
    while time.time() < deadline:
        busy = page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-InputPrompt').filter(has_text='[*]').count()
        status = ' '.join(page.locator('.jp-StatusBar-TextItem').all_inner_texts())
        calm = calm + 1 if not busy and 'Idle' in status else 0
        if calm >= 2: return
        time.sleep(0.5)
    raise AssertionError('the notebook did not finish running')


def _title(widget) -> str:
    return widget.locator('.gtitle').first.text_content(timeout=10_000)   # SVG text: no inner_text


def _changes(widget, act, what):
    before = _title(widget)
    act()
    for _ in range(100):
        if _title(widget) != before: return
        time.sleep(0.1)
    raise AssertionError(f'{what} did not change the figure (title still {before!r})')


def _scroll_through(page):
    "Bring every output into view once: JupyterLab draws the outputs of cells out of view only when they come into it."
    for o in page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output').all():
        try: o.scroll_into_view_if_needed(timeout=2_000)
        except Exception: pass


def _rendered(page, n=3, scroll=False):
    "The notebook's n widgets, each drawn (a plot with data), with no widget error or bare repr on the page."
    widgets = page.locator(WIDGET)
    deadline = time.time() + 60
    while True:
        if scroll: _scroll_through(page)
        text = '\n'.join(page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output').all_inner_texts())
        assert 'Error displaying widget' not in text and 'FigureWidget(' not in text and 'VBox(' not in text, text[-2000:]
        drawn = [widgets.nth(i).locator('.js-plotly-plot').count() for i in range(widgets.count())]
        if len(drawn) >= n and all(drawn): break
        if time.time() > deadline:
            page.screenshot(path=str(Path(os.environ.get('PHYSNB_SCREENSHOTS', '/tmp')) / 'widgets_not_drawn.png'))
            raise AssertionError(f'{n} widgets expected, drawn: {drawn}; the page ends with: {text[-1500:]}')
        time.sleep(0.5)
    assert widgets.count() == n
    for i in range(n):
        w = widgets.nth(i)
        assert (w.locator('.hm image').count() + w.locator('path.js-line').count()) > 0, f'widget {i} draws no data'
    return widgets


def _run_all(page, timeout=180):
    "Wait for the kernel, then Run All and wait until it is done."
    page.locator('.jp-NotebookPanel .jp-Cell').first.wait_for(timeout=60_000)
    _wait_idle(page)
    page.locator('.lm-MenuBar-itemLabel', has_text='Run').click()
    page.locator('li.lm-Menu-item[data-command="runmenu:run-all"]').click()
    _wait_idle(page, timeout)


def _save_and_reload(page):
    "Save (the outputs name the widgets; the kernel still holds them), then reload the tab with the kernel running."
    page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell').first.click()
    page.keyboard.press('Control+s')
    page.locator('.jp-mod-dirty').wait_for(state='detached', timeout=30_000)
    page.reload()
    page.locator('.jp-NotebookPanel .jp-Cell').first.wait_for(timeout=60_000)


def test_the_widgets_render_respond_and_survive_a_reload(lab):
    errors = []
    with _browser_page(errors) as page:
        page.goto(f"{lab['url']}/lab/tree/widgets.ipynb?reset&token={lab['token']}")
        _run_all(page)
        explorer, scrubber, projection = (_rendered(page).nth(i) for i in range(3))
        if not page.locator('.jp-FileBrowser').is_visible():             # 1280 px with the file browser open:
            page.locator('[data-id="filebrowser"]').first.click()        # every figure fits its output area
            page.locator('.jp-FileBrowser').wait_for(state='visible', timeout=10_000)
        time.sleep(1.5)
        for i, w in enumerate((explorer, scrubber, projection)):
            area, plot = w.bounding_box(), w.locator('.js-plotly-plot').first.bounding_box()
            assert plot['x'] + plot['width'] <= area['x'] + area['width'] + 2, (i, plot, area)
            legend = w.locator('.legend')
            if legend.count():
                box = legend.first.bounding_box()
                assert box['x'] + box['width'] <= area['x'] + area['width'] + 2, (i, 'legend', box, area)

        _changes(explorer, lambda: explorer.locator('select').nth(1).select_option(index=1), 'the compression dropdown')
        _changes(explorer, lambda: explorer.locator('select').nth(0).select_option('b'), 'the field dropdown')
        for i, what in ((0, 'the sample slider'), (1, 'the time slider')):
            _changes(explorer, lambda: (explorer.locator('.slider-container .noUi-handle').nth(i).focus(),
                                        page.keyboard.press('ArrowRight')), what)
        _changes(scrubber, lambda: (scrubber.locator('.noUi-handle').first.focus(), page.keyboard.press('ArrowRight')), 'the step slider')
        _changes(scrubber, lambda: scrubber.locator('select').select_option('v'), 'the field dropdown of the scrubber')
        _changes(projection, lambda: (projection.locator('.noUi-handle').first.focus(), page.keyboard.press('ArrowRight')),
                 'the angle slider')

        _save_and_reload(page)                         # the kernel still runs: the widgets must draw again from its state
        _rendered(page, scroll=True)
    errors = [e for e in errors if 'favicon' not in e]
    assert not errors, errors


def _boxes_overlap(a, b) -> bool:
    return not (a['x'] + a['width'] <= b['x'] or b['x'] + b['width'] <= a['x'] or a['y'] + a['height'] <= b['y'] or b['y'] + b['height'] <= a['y'])


def test_the_preview_animation_has_colour_bars_clear_controls_and_no_page_error(tmp_path):
    "physnb preview's page: a colour bar per panel, play/pause clear of the slider and its label, no page error when the slider is dragged during play."
    import torch
    from physnb.cli import preview_figure
    from physnb.results import QUIET_INTERRUPTS
    from physnb.sim.systems import SYSTEMS
    trajs = {n: SYSTEMS[n].simulate(1, res=16, steps=12, seed=0, device='cpu', progress=False) for n in ('gray_scott', 'ns2d')}
    (tmp_path / 'preview.html').write_text(preview_figure(trajs).to_html(include_plotlyjs=True, full_html=True, post_script=QUIET_INTERRUPTS))
    errors = []
    with _browser_page(errors, height=800) as page:
        page.goto((tmp_path / 'preview.html').as_uri()); page.wait_for_selector('.slider-container')
        assert page.locator('.colorbar').count() == 2
        buttons = [page.locator('.updatemenu-button').nth(i).bounding_box() for i in range(page.locator('.updatemenu-button').count())]
        assert len(buttons) == 2                                                  # play and pause
        for part in ('.slider-label', '.slider-rail-rect'):                         # the 'frame N' label and the slider
            assert not any(_boxes_overlap(b, page.locator(part).first.bounding_box()) for b in buttons), part
        page.locator('.updatemenu-button').first.click(); time.sleep(0.3)          # play, then drag the slider while it plays
        rail = page.locator('.slider-rail-rect').first.bounding_box()
        y = rail['y'] + rail['height'] / 2
        page.mouse.move(rail['x'] + 5, y); page.mouse.down()
        for k in range(15): page.mouse.move(rail['x'] + 5 + k * rail['width'] / 16, y); time.sleep(0.03)
        page.mouse.up(); time.sleep(1)
        assert page.locator('.slider-label').first.text_content().startswith('frame ')
    assert not errors, errors


# 03b, where a reload broke; 08a's explorer is the fixture's third widget, and its notebook (37 s here) is left to make docs
@pytest.mark.parametrize('name, n_widgets', [('03b_viz.widgets', 2)])
def test_a_widget_notebook_runs_and_draws_again_after_a_reload(tmp_path, name, n_widgets):
    "The widget notebooks themselves, run in JupyterLab: each widget draws and its slider redraws it; saved and reloaded with the kernel running, all draw again."
    nb = nbformat.read(ROOT / 'nbs' / f'{name}.ipynb', as_version=4)
    nb.cells = [c for c in nb.cells if 'nbdev_export' not in c.source]              # the copy is not in the repository
    nbformat.write(nb, tmp_path / f'{name}.ipynb')
    errors = []
    with jupyterlab(tmp_path) as lab, _browser_page(errors) as page:
        page.goto(f"{lab['url']}/lab/tree/{name}.ipynb?reset&token={lab['token']}")
        _run_all(page, 400)
        for i in range(n_widgets):
            w = _rendered(page, n_widgets, scroll=True).nth(i)
            w.scroll_into_view_if_needed()
            _changes(w, lambda: (w.locator('.noUi-handle').first.focus(), page.keyboard.press('ArrowRight')), f'the first slider of widget {i}')
        _save_and_reload(page)
        _rendered(page, n_widgets, scroll=True)
    errors = [e for e in errors if 'favicon' not in e]
    assert not errors, errors
