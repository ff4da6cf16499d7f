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

# The main job: baseline vs tomesd vs ours on the SD1.5 architecture (seeded random weights,
# sharpened attention for fidelity), 512 px, batch 2 (CFG), one denoiser forward; prints the table.
# A few minutes on 2 CPU cores. The full bench: `tomesd-ext bench --help`, docs/benchmarks.md.
demo: setup
	$(PY) -m tomesd_ext.cli bench --model sd15 --resolution 512 --batch 2 --ratios 0.5 \
		--methods tome,tomesd --inputs photo --repeats 2 --warmup 0 --json out/demo.json

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
