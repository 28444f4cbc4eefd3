# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both build .venv/ on first use (python -m venv + pip: the pinned torch/torchvision wheels
# come from the local disk; uv/poetry would download ~3 GB instead) and reuse it afterwards.
# pip installs without compiling every module's bytecode (a fresh .venv in ~65 s instead of
# ~130 s); Python writes it the first time a module is imported, so only the ~3k modules that
# run get compiled. This machine and CI set PYTHONDONTWRITEBYTECODE=1, which would make every
# process compile torch from source again (~17 s per import instead of ~7 s): make's commands
# run without it.
unexport PYTHONDONTWRITEBYTECODE
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# open_clip's own trainer (benchmarks/data_throughput.py's peer) needs webdataset<=0.2.86 and
# pandas, which conflict with ours: it gets a virtual environment of its own.
PEER := .venv-openclip
PEER_STAMP := $(PEER)/.installed
PEER_PINS := torch==2.14.1 torchvision==0.29.1 "open_clip_torch[training]==3.3.0" "webdataset<=0.2.86"

.PHONY: demo test lint typecheck pytest bench bench-peer clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-compile --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlp demo

# mypy (one core, ~1 min on a fresh clone) runs beside pytest instead of before it
test: $(STAMP) lint
	$(MAKE) --no-print-directory -j2 typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy vlp data_pipelines evals launch

# Two workers (pytest-xdist) on the 2-core machine CI runs on: slow tests go first
# (tests/conftest.py), workers steal what is left; PYTEST_WORKERS=0 runs in one process.
# One torch thread per process (PYTEST_THREADS): the workers already fill the cores, and torch's
# default (a thread per core in each worker and in each rank it starts) oversubscribes them.
PYTEST_WORKERS ?= 2
PYTEST_THREADS ?= 1

pytest: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$(PYTEST_THREADS) $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal --durations=40

$(PEER_STAMP):
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/python -m pip install --quiet --upgrade pip
	$(PEER)/bin/python -m pip install --quiet --no-compile $(PEER_PINS)
	touch $(PEER_STAMP)

bench-peer: $(PEER_STAMP)

bench: $(STAMP) $(PEER_STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/contrastive_loss.py
	$(BIN)/python benchmarks/data_throughput.py

clean-venv:
	rm -rf $(VENV) $(PEER)
