# `make test` and `make repro` bootstrap .venv themselves; nothing is reinstalled when up to date.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1

.PHONY: test repro venv clean-venv

venv: $(STAMP)

# The stamp depends on pyproject.toml: editing dependencies refreshes the venv, nothing else does.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

repro: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

clean-venv:
	rm -rf $(VENV)

# The paper profile end to end on random ViT-B-16 weights and a tiny generated CoOp layout (~2 min, CPU).
.PHONY: smoke-paper paper
smoke-paper: $(STAMP)
	CLIPPRUNE_SMOKE=1 $(BIN)/python -m pytest tests/test_paper_smoke.py

# Switch to the paper profile (GPU + network, or local weights/datasets) and run it.
paper: $(STAMP)
	cp profiles/paper.yaml params.yaml
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
