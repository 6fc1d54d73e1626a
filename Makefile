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

.PHONY: install test test-slow test-slurm demo lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(foreach p,$(TORCH_SPEC),'$(p)')
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m 'not slow and not slurm'

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Sweeps through a real single-node SLURM started on this machine (tests/helpers/slurm.py):
# slurm-wlm, slurmdbd, munge and mariadb-server are apt-get installed first when missing (root).
test-slurm: $(STAMP)
	CRC_SLURM_INSTALL=1 $(PY) -m pytest -q -p no:cacheprovider -m slurm -rs

lint: $(STAMP)
	$(VENV)/bin/ruff check crc_lightning hydra_plugins tests benchmarks
	$(VENV)/bin/ruff format --check crc_lightning hydra_plugins tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format crc_lightning hydra_plugins tests benchmarks
	$(VENV)/bin/ruff check --fix crc_lightning hydra_plugins tests benchmarks

# The main job end-to-end on the built-in synthetic cohort (minutes on a laptop CPU):
# synthetic cohort -> crop store -> short SimCLR pretraining on a second (OOD) synthetic cohort ->
# baseline and OODp classifiers over two seeds -> report. No ImageNet weights are downloaded, so the
# baseline opts out explicitly (weights=none) and the report labels it as random-init. Each job is a
# 3-fold cross-validation (split.n_splits=3 instead of the default 5, to keep the demo short):
# every patient is tested once per seed.
DEMO_DIR ?= outputs/demo
DEMO_RUN := res=32 labels=three seed=0,1 split.n_splits=3 trainer=cpu trainer.max_epochs=15 \
	trainer.enable_progress_bar=false model.optimizer.lr=0.01 hydra.sweep.dir=$(DEMO_DIR)/sweep
demo: $(STAMP)
	$(PY) -m crc_lightning.preprocess progress=false hydra.run.dir=$(DEMO_DIR)/preprocess
	$(PY) -m crc_lightning.pretrain res=32 epochs=20 batch_size=64 trainer.enable_progress_bar=false \
		hydra.run.dir=$(DEMO_DIR)/pretrain
	$(PY) -m crc_lightning.run -m variant=baseline model.backbone.weights=none $(DEMO_RUN) \
		'hydra.sweep.subdir=baseline_seed$${seed}'
	$(PY) -m crc_lightning.run -m variant=oodp $(DEMO_RUN) 'hydra.sweep.subdir=oodp_seed$${seed}'
	@echo; echo "demo report: $(DEMO_DIR)/sweep/report/report.md"

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
