# `make test` and `make repro` bootstrap .venv themselves; nothing is reinstalled when up to date.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1

# Offline where no download can succeed (tests, the default profile): a named pretrained tag then fails in
# seconds instead of a minute. Never for `paper`, which fetches the OpenAI weights from the hub.
test test-all repro smoke-paper gpu-check: export HF_HUB_OFFLINE := 1

.PHONY: test repro venv clean-venv

venv: $(STAMP)

# The stamp depends on pyproject.toml: editing dependencies refreshes the venv, nothing else does.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# `make test`: the quick suite (about 5 minutes on 2 cores); `make test-all` adds the slow tests (CI also sets
# CLIPPRUNE_SMOKE=1, which adds the paper profile's smoke run).
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

.PHONY: test-all
test-all: $(STAMP)
	$(BIN)/python -m pytest

repro: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

clean-venv:
	rm -rf $(VENV)

# The paper profile end to end: random ViT-B-16-quickgelu weights from a .bin, two CoOp datasets laid out from the
# real split files and staged from one root, dvc.yaml's own commands (~5 min on 2 CPU cores).
.PHONY: smoke-paper paper
smoke-paper: $(STAMP)
	CLIPPRUNE_SMOKE=1 $(BIN)/python -m pytest tests/test_paper_smoke.py

# The prepared GPU check (benchmarks/gpu_check.py): bench of every row at the predictor's GFLOPs, golden search speed
# against its FLOP minimum, the paper smoke run and the golden stage over NCCL, on random weights, offline, within
# GPU_CHECK_BUDGET seconds (each part that would overrun is skipped, with a note); ends with one JSON line. Without
# CUDA it runs its small mode (clipprune-tiny, under 2 minutes on a CPU). CHECK_PY=python3 runs it with an interpreter
# that already has the packages instead of .venv (a GPU box without a network, the missing ones carried as wheels).
GPU_CHECK_BUDGET ?= 420
GPU_CHECK_ARGS ?=
CHECK_PY ?=
.PHONY: gpu-check
gpu-check: $(if $(CHECK_PY),,$(STAMP))
	$(or $(CHECK_PY),$(BIN)/python) benchmarks/gpu_check.py --budget-s $(GPU_CHECK_BUDGET) $(GPU_CHECK_ARGS)

# Switch to the paper profile and run it (GPU + network, or local weights and datasets). It never overwrites a
# params.yaml you edited: commit or stash it first, or run `dvc repro` on your edited file directly.
# Before anything is fetched, the data stage's --check-only lists every missing prerequisite (packages, disk,
# datasets), one line each. `make default` is the way back to the default profile.
.PHONY: default
PAPER_STAMP := $(VENV)/.installed-paper
$(PAPER_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[paper]'
	touch $(PAPER_STAMP)

paper: $(STAMP)
	@cmp -s params.yaml profiles/paper.yaml || git diff --quiet HEAD -- params.yaml || { \
	  echo "error: params.yaml has uncommitted edits that make paper would overwrite; commit or stash them (git stash), or run dvc repro on them directly" >&2; exit 2; }
	$(MAKE) --no-print-directory $(PAPER_STAMP)
	$(BIN)/python -m stages.data --check-only --params profiles/paper.yaml
	cp profiles/paper.yaml params.yaml
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

# Back to the default profile: params, lock and committed reports from git, then the outputs DVC has cached
# for them (`make repro` rebuilds whatever the cache lacks).
default:
	git checkout HEAD -- params.yaml dvc.lock reports
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc checkout --quiet || echo "some outputs of the default profile are not in the DVC cache: make repro rebuilds them"
