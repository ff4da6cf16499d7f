# Task runner. `make demo` runs the main job, `make test` the tests; both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench kernels clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Users bring their own torch (>=2.1); a fresh machine gets the pinned local build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.14.1
	$(PY) -m pip install -q -e ".[dev,video]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tomesd-ext demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
