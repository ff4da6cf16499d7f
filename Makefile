# Task runner. `make demo` runs the main job, `make test` the tests; both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test comfyui bench kernels clean

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

# ComfyUI for tests/comfy (the nodes in a real ComfyUI, in-process and as a server on loopback).
# COMFYUI_PATH set: that checkout is used. Otherwise the source snapshot COMFYUI_SNAPSHOT (a .tar.gz
# holding a folder ComfyUI/) is unpacked once into COMFYUI_CACHE, outside the checkout, and reused.
# Its requirements go into $(VENV), keeping the installed torch. With neither, the ComfyUI tests
# skip, except in CI (CI=true), where that is an error. docs/development.md has the details.
COMFYUI_SNAPSHOT ?= $(lastword $(sort $(wildcard ../shared/vendor/ComfyUI-*.tar.gz)))
COMFYUI_CACHE ?= $(or $(TOMESD_EXT_CACHE),$(HOME)/.cache/tomesd_ext)
# $(call unpacked,SNAPSHOT): the ComfyUI folder that SNAPSHOT unpacks to in COMFYUI_CACHE
unpacked = $(abspath $(COMFYUI_CACHE)/$(basename $(basename $(notdir $(1)))))/ComfyUI
COMFYUI_UNPACK := $(if $(COMFYUI_PATH),,$(COMFYUI_SNAPSHOT))
COMFYUI_PATH := $(or $(COMFYUI_PATH),$(if $(COMFYUI_UNPACK),$(call unpacked,$(COMFYUI_UNPACK))))
IN_CI := $(filter true 1 yes,$(CI))

# The older ComfyUI release of the smoke tests (tests/comfy/test_comfyui_old.py), the same way:
# COMFYUI_OLD_PATH set, or the snapshot COMFYUI_OLD_SNAPSHOT unpacked into COMFYUI_CACHE. It runs
# on $(VENV) as the main ComfyUI prepared it; only its own frontend, templates and docs packages
# go into COMFYUI_OLD_PYLIB (first on its PYTHONPATH in the tests).
COMFYUI_OLD_SNAPSHOT ?= $(lastword $(sort $(wildcard ../shared/vendor/older/ComfyUI-*.tar.gz)))
COMFYUI_OLD_UNPACK := $(if $(COMFYUI_OLD_PATH),,$(COMFYUI_OLD_SNAPSHOT))
COMFYUI_OLD_PATH := $(or $(COMFYUI_OLD_PATH),$(if $(COMFYUI_OLD_UNPACK),$(call unpacked,$(COMFYUI_OLD_UNPACK))))
COMFYUI_OLD_PYLIB ?= $(if $(COMFYUI_OLD_PATH),$(abspath $(COMFYUI_OLD_PATH)/..)/pylib)

# Node packs users combine with ours (tests/comfy/test_packs_*.py), from source snapshots unpacked
# once into COMFYUI_PACKS_DIR; the tests link the ones they need into the ComfyUI they start.
COMFYUI_PACK_SNAPSHOTS ?= $(sort $(wildcard ../shared/vendor/custom_nodes/*.tar.gz))
COMFYUI_PACKS_DIR ?= $(abspath $(COMFYUI_CACHE)/packs)

# The newest comfyui-frontend-package (the ComfyUI web app) that the browser test also runs
# against, besides the one the main ComfyUI pins (its requirements.txt): installed once, without
# dependencies, into COMFYUI_NEWER_FRONTEND_DIR in COMFYUI_CACHE and served with ComfyUI's
# --front-end-root. Pinned, so every run tests the same app; raise the pin to test a newer one.
COMFYUI_NEWER_FRONTEND_VERSION ?= 1.58.1
COMFYUI_NEWER_FRONTEND_DIR ?= $(abspath $(COMFYUI_CACHE))/comfyui-frontend-package-$(COMFYUI_NEWER_FRONTEND_VERSION)
COMFYUI_NEWER_FRONTEND ?= $(COMFYUI_NEWER_FRONTEND_DIR)/comfyui_frontend_package/static

comfyui: setup
ifneq ($(COMFYUI_PACK_SNAPSHOTS),)
	bash scripts/comfyui_packs_for_tests.sh "$(COMFYUI_PACKS_DIR)" $(COMFYUI_PACK_SNAPSHOTS)
else ifneq ($(IN_CI),)
	@echo "error: CI needs the node-pack snapshots for tests/comfy (COMFYUI_PACK_SNAPSHOTS, default ../shared/vendor/custom_nodes/*.tar.gz)" >&2
	@exit 1
endif
ifneq ($(COMFYUI_PATH),)
	bash scripts/comfyui_for_tests.sh $(PY) "$(COMFYUI_PATH)" "$(COMFYUI_UNPACK)"
	bash scripts/comfyui_for_tests.sh --frontend $(PY) $(COMFYUI_NEWER_FRONTEND_VERSION) "$(COMFYUI_NEWER_FRONTEND_DIR)"
else ifneq ($(IN_CI),)
	@echo "error: CI needs ComfyUI for tests/comfy: no COMFYUI_PATH and no snapshot (COMFYUI_SNAPSHOT, default ../shared/vendor/ComfyUI-*.tar.gz)" >&2
	@exit 1
else
	@echo "note: no ComfyUI (set COMFYUI_PATH or COMFYUI_SNAPSHOT): the ComfyUI tests will skip"
endif
ifneq ($(COMFYUI_OLD_PATH),)
	bash scripts/comfyui_for_tests.sh $(PY) "$(COMFYUI_OLD_PATH)" "$(COMFYUI_OLD_UNPACK)" "$(COMFYUI_OLD_PYLIB)"
else ifneq ($(IN_CI),)
	@echo "error: CI needs the older ComfyUI release: no COMFYUI_OLD_PATH and no snapshot (COMFYUI_OLD_SNAPSHOT, default ../shared/vendor/older/ComfyUI-*.tar.gz)" >&2
	@exit 1
else
	@echo "note: no older ComfyUI (set COMFYUI_OLD_PATH or COMFYUI_OLD_SNAPSHOT): its smoke tests will skip"
endif

test: setup comfyui
	COMFYUI_PATH="$(COMFYUI_PATH)" COMFYUI_OLD_PATH="$(COMFYUI_OLD_PATH)" COMFYUI_OLD_PYLIB="$(COMFYUI_OLD_PYLIB)" \
		COMFYUI_PACKS_DIR="$(if $(COMFYUI_PACK_SNAPSHOTS),$(COMFYUI_PACKS_DIR))" \
		COMFYUI_NEWER_FRONTEND="$(COMFYUI_NEWER_FRONTEND)" $(PY) -m pytest -q --durations=25

clean:
	rm -rf $(VENV) build *.egg-info
