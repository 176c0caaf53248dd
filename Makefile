# Two entry points (see README "Quick start"): `make demo` and `make test`.
# Both build (or reuse) the virtual environment .venv inside the clone from pyproject.toml alone.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: env demo test check pytest browser validators docs clean-build

# torch/torchvision are pinned in pyproject.toml; their wheels install from the local disk here
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)

# the main job: train on the demo brain MR series (no data needed), a few minutes on 2 CPU cores; run again to
# continue the same run (it resumes), `rm -r runs/demo` to start over
DEMO_EPOCHS ?= 150
demo: env
	$(BIN)/medgan train --out runs/demo --epochs $(DEMO_EPOCHS) $$(test -f runs/demo/config.json && echo --resume)
	@echo ""
	@echo "pictures: runs/demo/samples/progress.gif (every epoch), runs/demo/loss.png; what the run is: runs/demo/model_card.md"
	@echo "next:"
	@echo "  $(BIN)/medgan serve runs/demo                                 # explore it in the browser (http://127.0.0.1:7860)"
	@echo "  $(BIN)/medgan evaluate runs/demo demo                         # score it against the demo slices (updates the model card)"
	@echo "  $(BIN)/medgan generate runs/demo -n 64 --out runs/demo/synthetic --format dicom   # synthetic DICOM"
	@echo "  $(BIN)/medgan export runs/demo --format onnx                  # run it without this library"

# notebooks and the library in step, notebooks clean, then the tests, then the notebooks and docs
check: env
	$(BIN)/python tools/check_nbs.py

pytest: env browser validators
	$(BIN)/python -m pytest -q -rs tests

# the app's browser test drives Debian's chromium (Playwright never downloads a browser here)
browser:
	@if [ -x /usr/bin/chromium ]; then echo "chromium: /usr/bin/chromium"; \
	elif [ "$$(id -u)" = 0 ]; then (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  || echo "could not install chromium: the browser test will be skipped"; \
	else echo "chromium missing and not root: the browser test will be skipped (apt-get install chromium as root)"; fi

# the DICOM validity tests run dicom3tools' dciodvfy and dcm2niix (Debian packages); in CI (CI set) a missing one fails them
validators:
	@if command -v dciodvfy >/dev/null && command -v dcm2niix >/dev/null; then echo "validators: $$(command -v dciodvfy) $$(command -v dcm2niix)"; \
	elif [ "$$(id -u)" = 0 ]; then (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools dcm2niix) \
	  || echo "could not install dicom3tools and dcm2niix: the DICOM validity tests will be skipped (fail in CI)"; \
	else echo "dciodvfy or dcm2niix missing and not root: the DICOM validity tests will be skipped (apt-get install dicom3tools dcm2niix as root)"; fi

docs: env
	$(BIN)/python tools/build_docs.py

test: check pytest docs

clean-build:
	rm -rf _build _proc _docs
