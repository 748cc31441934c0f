# Two commands matter on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-calibration bench-capacity clean predictor-model predictor-eval

$(STAMP): pyproject.toml setup.py $(wildcard sloproxy/predictor/*.c)  # an editable install compiles the .c files
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sloproxy demo

# First a Redis server for the shared-state tests: redis-server on PATH or the one the dev extras install
# (tests/redis_server.py); without one, a line saying so and nothing run.
test: $(STAMP)
	@$(BIN)/python tests/redis_server.py
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-calibration: $(STAMP)
	$(BIN)/sloproxy bench calibration

bench-capacity: $(STAMP)
	$(BIN)/python bench/emulator_capacity.py

clean:
	rm -rf $(VENV) build *.egg-info sloproxy/predictor/*.so

LENGTHS := ../shared/data/lengths
# The packaged default length predictor, trained on all the shared data (deterministic, seed 0).
predictor-model: $(STAMP)
	$(BIN)/sloproxy predictor train --prompts $(LENGTHS)/alpaca_eval_prompts.jsonl \
		--lengths $(LENGTHS)/alpaca_eval_lengths.csv --seed 0 --out sloproxy/predictor/default_model

# Held-out figures: train on 80% of the prompts (seeded split by prompt id), evaluate on the other 20%.
predictor-eval: $(STAMP)
	$(BIN)/sloproxy predictor train --prompts $(LENGTHS)/alpaca_eval_prompts.jsonl \
		--lengths $(LENGTHS)/alpaca_eval_lengths.csv --holdout 0.2 --seed 0 --out build/predictor-holdout
	$(BIN)/sloproxy predictor eval --model build/predictor-holdout --prompts $(LENGTHS)/alpaca_eval_prompts.jsonl \
		--lengths $(LENGTHS)/alpaca_eval_lengths.csv --holdout-only --json
