"""`make docs`: run the notebooks at their smoke defaults and write static HTML pages, with their outputs, to _docs/.

No Quarto here, so nbdev's docs site is out: each notebook is executed by nbclient in `nbs/` (as nbdev-test
runs it; cells tagged `skip-execution` are skipped), then shaped for reading as nbdev's pages are (cells marked
`#| hide` left out, `#| ...` directive lines dropped, links to other notebooks pointed at their pages), converted
by nbconvert's `lab` template, and pointed at one copy of plotly.js beside the pages (`_docs/plotly.min.js`, in
each page's <head>), so every figure opens offline and the folder holds plotly's 4.8 MB once (require.js
and the widget state, which a page needs no more, are left out; MathJax still comes from its CDN, so formulas
render when online and stay as TeX when not). Widgets show the figure they drew when the notebook ran (their
static copy). `_docs/index.html` links every page with its run time, or the error that stopped it.

    python tools/make_docs.py                      # every notebook, two at a time (about 4 minutes on two cores)
    python tools/make_docs.py 00_index 08a_viz.cramer_wold --out /tmp/docs
"""
from __future__ import annotations
import argparse, html, os, re, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


WIDGET_VIEW = 'application/vnd.jupyter.widget-view+json'
DIRECTIVE = re.compile(r'^\s*#\|\s*(\S+)')


def for_reading(nb):
    "A run notebook as a page shows it: no `#| hide` cells, no directive lines, widgets as their static copy."
    cells = []
    for cell in nb.cells:
        if cell.cell_type == 'code':
            lines = cell.source.splitlines()
            head = [m.group(1) for m in map(DIRECTIVE.match, lines) if m]
            if 'hide' in head: continue
            cell.source = '\n'.join(l for l in lines if not DIRECTIVE.match(l)).strip('\n')
            for out in cell.get('outputs', []):
                data = out.get('data', {})
                if WIDGET_VIEW in data:                     # the page has no kernel: the figure as drawn, or a note
                    del data[WIDGET_VIEW]
                    if 'text/html' not in data:
                        data['text/plain'] = '(an interactive widget: open the notebook in JupyterLab and run it to use it)'
        cells.append(cell)
    nb.cells = cells
    nb.metadata.pop('widgets', None)                       # the widget state (MBs of script) serves no page
    return nb


HEAD = '<head><script type="text/javascript" src="plotly.min.js"></script>'    # one copy of plotly.js for every page


def render(path: Path, out: Path, timeout: int = 900) -> tuple[str, float | str]:
    "Execute one notebook in nbs/ and write its page; (stem, seconds, or the error that stopped it)."
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    from physnb.core import atomic_write
    os.environ.update(PLOTLY_RENDERER='notebook', PHYSNB_PROGRESS='0', OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    nb, tic = nbformat.read(path, as_version=4), time.perf_counter()
    try:
        # kernels talk over IPC sockets in a folder of their own: two kernels started at once by TCP could pick
        # the same free port (seen: "Address already in use", then "Kernel died before replying")
        with tempfile.TemporaryDirectory(prefix='physnb-docs-') as sockets:
            ipc = Config(KernelManager=dict(transport='ipc', ip=str(Path(sockets) / 'kernel')))
            NotebookClient(nb, timeout=timeout, kernel_name='python3', config=ipc,      # the client starts and stops it
                           resources={'metadata': {'path': str(path.parent)}}).execute()
        result = round(time.perf_counter() - tic, 1)
    except CellExecutionError as e:                     # the page still shows what ran, and the error
        result = str(e).strip().splitlines()[-1][:300]
    except Exception as e:                              # a dead kernel, a cell over the timeout: named, the others go on
        result = f'{type(e).__name__}: {e}'[:300]
    exporter = HTMLExporter(template_name='lab')
    body, _ = exporter.from_notebook_node(for_reading(nb))
    body = body.replace(f'<script src="{exporter.require_js_url}"></script>', '')           # nothing on the page uses it
    body = re.sub(r'href="(?!https?:)([^"/]+)\.ipynb(#[^"]*)?"', r'href="\1.html\2"', body)   # notebook links -> pages
    body = re.sub(r'<script>\s*/\*\*\s*\* plotly\.js v.*?</script>', '', body, flags=re.S)   # plotly's renderer's own copy
    if 'plotly-graph-div' in body: body = body.replace('<head>', HEAD, 1)     # plotly.js before any figure
    with atomic_write(out / f'{path.stem}.html') as f: f.write(body)
    return path.stem, result


def build(names: list[str] | None = None, out: str | Path = ROOT / '_docs', timeout: int = 900,
          jobs: int = 1) -> dict:
    "Execute and render the notebooks `names` (stems; default every notebook of nbs/), `jobs` at a time; return {stem: seconds or error}."
    import plotly.offline
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from physnb.core import atomic_write
    nbs, out = ROOT / 'nbs', Path(out)
    paths = [nbs / f'{n}.ipynb' for n in names] if names else sorted(p for p in nbs.glob('*.ipynb') if not p.name.startswith(('_', '.')))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing: raise FileNotFoundError(f"no such notebook(s): {', '.join(missing)}")
    if jobs < 1: raise ValueError(f'jobs={jobs}: at least 1')
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / 'plotly.min.js') as f: f.write(plotly.offline.get_plotlyjs())
    report = {}
    with ProcessPoolExecutor(max_workers=min(jobs, len(paths))) as pool:   # a kernel per notebook, each with one thread
        for done in as_completed([pool.submit(render, p, out, timeout) for p in paths]):
            stem, report[stem] = done.result()
            print(f'{stem}: {report[stem]}', file=sys.stderr, flush=True)
    report = {p.stem: report[p.stem] for p in paths}
    rows = ''.join(f'<li><a href="{html.escape(n)}.html">{html.escape(n)}</a> — '
                   f'{f"{v} s" if isinstance(v, float) else "<b>failed</b>: " + html.escape(v)}</li>' for n, v in report.items())
    with atomic_write(out / 'index.html') as f:
        f.write(f'<!doctype html><html><head><meta charset="utf-8"><title>physnb notebooks</title></head><body>'
                f'<h1>physnb: the notebooks, run</h1><p>Start with <a href="00_index.html">00_index</a>. Built '
                f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} at the notebooks\' smoke defaults.</p><ul>{rows}</ul></body></html>')
    return report


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('notebooks', nargs='*', help='notebook stems, e.g. 00_index 08a_viz.cramer_wold (default: all)')
    p.add_argument('--out', default=str(ROOT / '_docs'), help='output folder (default: _docs)')
    p.add_argument('--timeout', type=int, default=900, help='seconds per cell')
    p.add_argument('--jobs', type=int, default=min(2, os.cpu_count() or 1), help='notebooks run at a time (default: 2, or 1 on one core)')
    a = p.parse_args()
    report = build(a.notebooks or None, a.out, a.timeout, a.jobs)
    failed = [n for n, v in report.items() if not isinstance(v, float)]
    print(f"{len(report) - len(failed)} pages written to {a.out}" + (f"; failed: {', '.join(failed)}" if failed else ''))
    sys.exit(1 if failed else 0)
