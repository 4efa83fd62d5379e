SHELL := /bin/bash
# `make test` and `make bench` set themselves up on a fresh machine: they (re)create
# .venv whenever pyproject.toml changes. `make gpu-check` runs on the lent GPU machine,
# whose system python3 already has every dependency and no network.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build of torch (the pinned file installs in seconds here; a bare `torch` pulls CUDA).
TORCH  ?= torch==2.13.0
OUT    ?=
GPU_OUT := $(if $(OUT),$(OUT),results/gpu)
GPU_ARGS ?=

# `make bench` plans against a time budget (BUDGET, default 10m) and writes under the
# git-ignored runs/; `make bench-full` is the exhaustive matrix (every default size, 5
# rounds; about an hour on the 2-core CPU). Neither writes into the committed results/.
BUDGET ?= 10m
RUNS   ?= runs
BENCH_ARGS ?=

.PHONY: test bench bench-full gpu-check gpu-plan aot lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --durations=10

bench: $(STAMP)
	$(BIN)/lossreg bench --device auto --budget $(BUDGET) --out $(RUNS) $(BENCH_ARGS)

bench-full: $(STAMP)
	$(BIN)/lossreg bench --device auto --sizes default --rounds 5 --out $(RUNS)/full $(BENCH_ARGS)

aot: $(STAMP)
	$(BIN)/python -m lossreg.kernels.aot

lint: $(STAMP)
	$(BIN)/ruff check lossreg plugins tests benchmarks

# The GPU machine has no network: carry in wheels/ what it lacks, `pip download
# cloudpickle tqdm liger-kernel cut-cross-entropy --no-deps -d wheels/` (cloudpickle and
# tqdm are lossreg's own dependencies; the peers join the check when present).
gpu-check:
	python3 -m pip install -q --no-deps --no-build-isolation -e .
	if compgen -G "wheels/*.whl" > /dev/null; then python3 -m pip install -q --no-deps --no-index wheels/*.whl; fi
	mkdir -p $(GPU_OUT)/_logs
	python3 -m lossreg.gpu_check --plan | tee $(GPU_OUT)/_logs/gpu-plan.log
	set -o pipefail; python3 -m lossreg.gpu_check --out $(GPU_OUT) $(GPU_ARGS) 2>&1 | tee $(GPU_OUT)/_logs/gpu-check.log

# the plan of `make gpu-check` (what it runs, and how long), on any machine
gpu-plan: $(STAMP)
	$(BIN)/python -m lossreg.gpu_check --plan

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
