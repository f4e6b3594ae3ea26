# `make test` and `make run` are all the set-up a fresh machine needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

SEEDS ?= 5
STEPS ?= 1000

.PHONY: venv test run bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

run: $(STAMP)
	$(VENV)/bin/gradattn laws-check
	mkdir -p results
	$(VENV)/bin/gradattn em-vs-sgd --seeds $(SEEDS) --steps $(STEPS) \
	    --out results/em_vs_sgd.json --plot results/em_vs_sgd.png

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/seed_scaling.py
	$(PY) benchmarks/memory.py

clean:
	rm -rf $(VENV) results .pytest_cache
