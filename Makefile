# DistillService: `make serve` starts the server on the CPU, `make test` runs
# every test (with a short fuzz run; the soak test is skipped), `make fuzz`
# fuzzes every RPC for longer and `make soak` runs the soak test. All create
# and reuse a virtual environment in .venv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-server

.PHONY: serve test fuzz soak check protos bench clean

# Serving needs the server extra only; the tests and tools need everything.
$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[server]"
	touch $(SERVE_STAMP)

# torchdistill is the tests' oracle for the losses it has; its losses import
# without torchvision, whose PyPI build does not load beside the CPU torch.
$(STAMP): $(SERVE_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "torchdistill==1.1.5"
	touch $(STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/distill-server --device cpu $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# DISTILL_FUZZ_EXAMPLES examples per RPC (about 35 minutes on two cores),
# failures shrunk to a small input; DISTILL_FUZZ_RANDOM=1 draws new inputs.
DISTILL_FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP)
	DISTILL_FUZZ_EXAMPLES=$(DISTILL_FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py $(ARGS)

# DISTILL_SOAK_SECONDS of mixed load after a warm-up (default 60).
soak: $(STAMP)
	DISTILL_SOAK=1 $(BIN)/python -m pytest tests/test_soak.py $(ARGS)

check: $(STAMP)
	$(BIN)/ruff check core/distill_core client/distill_client server tests bench scripts examples
	$(BIN)/ruff format --check core/distill_core client/distill_client server tests bench scripts examples
	$(BIN)/mypy

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

bench: $(STAMP)
	$(BIN)/python bench/bench_loopback.py $(ARGS)
	$(BIN)/python bench/bench_engine.py
	$(BIN)/python bench/bench_zoo.py
	$(BIN)/python bench/bench_limits.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
