# Everything runs inside ./.venv, created on first use. torch is pinned to the local CPU wheel first so
# that the package's torch range never pulls a CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test run info posttrain clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

run: setup
	$(BIN)/nemotron3 generate --chat "What is 47 + 38?" --max-tokens 200
	$(BIN)/nemotron3 chat --tools --temperature 0 --message "Please compute 12 * 34." --max-tokens 200

# The post-training chain of the default model from the embedded base model (~1 h on 2 cores): SFT, three
# domain teachers, GRPO, MOPD, then the evaluations (docs/post-training.md).
posttrain: setup
	$(BIN)/python benchmarks/posttrain_chain.py --install-default

info: setup
	$(BIN)/nemotron3 info ultra-550b-a55b

clean:
	rm -rf $(VENV) .pytest_cache
