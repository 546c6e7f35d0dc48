# Two commands do all the set-up on a fresh machine with Python 3.11+ and make:
#   make train   create .venv, install the package, run the main job
#   make test    create .venv, install with the dev and parity extras, lint, run every test
# After an edit: make test-fast (no real data, torch, Keras or subprocesses; about a minute).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
DATA_DIR ?= $(HOME)/.cache/resnet_jax/tfds
CIFAR10 := $(DATA_DIR)/cifar10_jpeg/1.0.0/dataset_info.json

.PHONY: train test test-fast lint format data tables

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml changes.
$(VENV)/.installed-base: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev,parity]'
	touch $@ $(VENV)/.installed-base

ARCHIVE := $(SHARED)/data/cifar10_jpeg.tar.xz
ARCHIVE_SHA256 := fde4abe585fa9a27cdd4c85635d9dfd99147a0e64c32c35e5539acad14cf7ad3

# Checked, then extracted beside its final place and moved in: an interrupted extraction never
# leaves a half dataset behind the marker file that makes later runs skip this step.
$(CIFAR10):
	@test -f $(ARCHIVE) || { \
	  echo "error: $(ARCHIVE) not found; set SHARED=DIR to the folder holding data/cifar10_jpeg.tar.xz" >&2; exit 1; }
	@echo "$(ARCHIVE_SHA256)  $(ARCHIVE)" | sha256sum --check --status 2>/dev/null || { \
	  echo "error: $(ARCHIVE) is damaged: its sha256 is $$(sha256sum $(ARCHIVE) | cut -c1-16)..., expected $(ARCHIVE_SHA256); copy it again" >&2; exit 1; }
	@mkdir -p $(DATA_DIR) && rm -rf $(DATA_DIR)/.extracting && mkdir $(DATA_DIR)/.extracting
	tar -xJf $(ARCHIVE) -C $(DATA_DIR)/.extracting
	@rm -rf $(DATA_DIR)/cifar10_jpeg && mv $(DATA_DIR)/.extracting/cifar10_jpeg $(DATA_DIR)/ && rmdir $(DATA_DIR)/.extracting

data: $(CIFAR10)

WORKDIR ?= workdirs/demo
# Test processes (pytest-xdist). Each holds 8 simulated devices and up to ~5 GiB; many tests
# wait on subprocesses, so two share 2 cores well.
TEST_WORKERS ?= 2

# configs/demo.py: resnet20 on the real CIFAR-10 for a few minutes; rerunning resumes.
train: $(VENV)/.installed-base $(CIFAR10)
	$(PY) train.py --config=configs/demo.py --workdir=$(WORKDIR) --config.dataset.data_dir=$(DATA_DIR)

test: $(VENV)/.installed-dev $(CIFAR10)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	RESNET_JAX_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -n $(TEST_WORKERS) --durations=25  # slowest: keep CI short

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -m fast -q

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed-dev
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Rewrites every generated table of docs/ and results/ (a test fails when one is stale).
tables: $(VENV)/.installed-base
	$(PY) -m resnet_jax tables
