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

.PHONY: install test test-slow test-slurm chromium demo demo-full bench-demo lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(foreach p,$(TORCH_SPEC),'$(p)')
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) chromium
	$(PY) -m pytest -q -p no:cacheprovider -m 'not slow and not slurm'

# the browser test of report.html (tests/evaluation/test_html.py) needs Debian's chromium: installed
# when missing and we are root with apt-get (CI); otherwise that one test skips and says why
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "chromium not installed (not root or no apt-get): the report.html browser test skips"; fi; }

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

# The main job end-to-end on the built-in synthetic cohort, every stage, in ≤ 5 minutes on 2 CPU
# cores after the install (258 s measured by `make bench-demo`; each job a hold-out, DEMO_SPLIT=cv
# for cross-validated jobs): synthetic cohort -> crop store (preprocess) -> a short SimCLR pretraining
# on a second (OOD) synthetic cohort -> baseline and OODp classifiers over two seeds -> report.html.
# Small on purpose (res 32, a few epochs, batches of 32, 3 folds when `run` cross-validates): a
# smoke test of the whole pipeline, not a result; `make demo-full` trains longer for nicer numbers.
# No ImageNet weights are downloaded, so the baseline opts out explicitly (weights=none) and the
# report labels it random-init. Re-running resumes: finished jobs and pretraining are reused.
# `make bench-demo` (benchmarks/demo.py) times every stage of a fresh `make demo`.
DEMO_DIR ?= outputs/demo
DEMO_RES ?= 32
DEMO_EPOCHS ?= 4
DEMO_SSL_EPOCHS ?= 3
DEMO_SEEDS ?= 0,1
DEMO_BATCH ?= 32
DEMO_SPLIT ?= holdout
DEMO_FOLDS ?= 3
DEMO_RUN = res=$(DEMO_RES) labels=three seed=$(DEMO_SEEDS) trainer=cpu \
	trainer.max_epochs=$(DEMO_EPOCHS) callbacks.early_stopping.patience=$(DEMO_EPOCHS) \
	datamodule.batch_size=$(DEMO_BATCH) split=$(DEMO_SPLIT) split.n_splits=$(DEMO_FOLDS) \
	model.optimizer.lr=0.01 \
	trainer.enable_progress_bar=false hydra.sweep.dir=$(DEMO_DIR)/sweep
demo: $(STAMP)
	$(PY) -m crc_lightning.preprocess progress=false hydra.run.dir=$(DEMO_DIR)/preprocess
	$(PY) -m crc_lightning.pretrain res=$(DEMO_RES) epochs=$(DEMO_SSL_EPOCHS) batch_size=64 \
		model.warmup_epochs=1 ckpt_path=last trainer.enable_progress_bar=false \
		hydra.run.dir=$(DEMO_DIR)/pretrain
	$(PY) -m crc_lightning.run -m variant=baseline model.backbone.weights=none $(DEMO_RUN) \
		'hydra.sweep.subdir=baseline_seed$${seed}' '~hydra.callbacks.sweep_report'
	$(PY) -m crc_lightning.run -m variant=oodp $(DEMO_RUN) 'hydra.sweep.subdir=oodp_seed$${seed}'
	@echo; echo "demo report (open it in a browser): $(DEMO_DIR)/sweep/report/report.html"

demo-full:
	$(MAKE) demo DEMO_DIR=outputs/demo-full DEMO_EPOCHS=15 DEMO_SSL_EPOCHS=20 DEMO_SEEDS=0,1,2 \
		DEMO_BATCH=16 DEMO_SPLIT=cv DEMO_FOLDS=5

bench-demo: $(STAMP)
	$(PY) benchmarks/demo.py

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
