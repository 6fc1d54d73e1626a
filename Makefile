# crc-lightning — the README's two commands (`make demo`, `make test`) are the whole setup.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision first, from the same index as the rest; lower bounds only (see pyproject.toml)
TORCH_SPEC ?= torch>=2.2 torchvision>=0.17
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export PYTHONHASHSEED ?= 0

.PHONY: install test test-slow demo lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(foreach p,$(TORCH_SPEC),'$(p)')
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check crc_lightning tests benchmarks
	$(VENV)/bin/ruff format --check crc_lightning tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format crc_lightning tests benchmarks
	$(VENV)/bin/ruff check --fix crc_lightning tests benchmarks

# The main job end-to-end on the built-in synthetic cohort (minutes on a laptop CPU).
# No ImageNet weights are downloaded here, so the demo opts out explicitly (weights=none).
DEMO_DIR ?= outputs/demo
DEMO_RUN := res=32 labels=three trainer=cpu trainer.max_epochs=12 trainer.enable_progress_bar=false \
	model.backbone.weights=none
demo: $(STAMP)
	$(PY) -m crc_lightning.preprocess progress=false hydra.run.dir=$(DEMO_DIR)/preprocess
	$(PY) -m crc_lightning.run variant=baseline seed=0 $(DEMO_RUN) hydra.run.dir=$(DEMO_DIR)/baseline

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
