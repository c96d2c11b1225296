# physnb: two commands for a fresh clone (see README):
#   make main   set up .venv, then run the main job, the tokeniser transfer study (writes runs/main/report.html)
#               GPU scale: make main PRESET=gpu DEVICE=cuda OUT=runs/main_gpu
#   make test   set up .venv, then run the whole test suite (notebooks + tests/)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
EXTRAS  ?= dev,oracles
OUT     ?= runs/main
PRESET  ?= quickstart
DEVICE  ?= auto
SHELL   := /bin/bash
.SHELLFLAGS := -o pipefail -c
QUIET   := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: setup install main test test-notebooks test-pytest bench docs
# (re)install only when pyproject.toml's content changed: nbdev-export rewrites it and bumps its mtime
setup:
	@cmp -s pyproject.toml $(VENV)/.physnb-installed 2>/dev/null || $(MAKE) --no-print-directory install

# torch goes in first and on its own: an unpinned torch would pull GBs of CUDA wheels
install:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip $(QUIET)
	$(BIN)/python -m pip install -q "$(TORCH)" $(QUIET)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" $(QUIET)
	cp pyproject.toml $(VENV)/.physnb-installed

main: setup
	$(BIN)/physnb main --out-dir $(OUT) --preset $(PRESET) --device $(DEVICE)

test: setup
	$(MAKE) --no-print-directory test-notebooks test-pytest

test-notebooks:
	PHYSNB_PROGRESS=0 PATH="$(abspath $(BIN)):$$PATH" $(BIN)/nbdev-test --n-workers 2 --timing

# pytest exits 5 when it collects nothing; that is not a failure of the suite
test-pytest:
	PHYSNB_PROGRESS=0 PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -ra tests; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# every bench/bench_*.py; each prints ratios against its peer and writes bench/out/<name>.json
bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python $$b || exit 1; done

# static HTML of every notebook run at its smoke defaults, under _docs/ (index.html links them); NOTEBOOKS="00_index 05_finetune" for a few
docs: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tools/make_docs.py $(NOTEBOOKS)
