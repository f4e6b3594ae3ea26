# `make test` (quick), `make test-all` (everything, what CI runs) and `make run` are all the set-up
# a fresh machine needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# One stamp per extra: `make test` never installs torch; `make test-all` and `make bench` do.
STAMP       := $(VENV)/.installed
STAMP_BENCH := $(VENV)/.installed-bench

SEEDS ?= 5
STEPS ?= 1000

.PHONY: venv test test-all test-compat lint run bench docs clean

venv: $(STAMP)

# pip runs quietly (its progress output is long), so each install says first what it does.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing gradattn and its dependencies (jax, jaxlib, flax, optax, numpy, scipy, matplotlib)" \
	    "with the dev extra (pytest, hypothesis, chex, the notebook runner, pdoc, ruff, mypy) into $(VENV):" \
	    "a minute or two on a fresh machine"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The dev extra and the bench extra (torch, for the comparisons with the PyTorch reference).
$(STAMP_BENCH): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing gradattn with its dev and bench extras (jax, flax, pytest, ..., torch) into $(VENV):" \
	    "a few minutes on a fresh machine"
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP) $(STAMP_BENCH)

PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# The quick suite, for every change: all but the end-to-end runs marked slow. It checks values,
# not speed, and compiling is most of its time, so XLA:CPU compiles the cheap way: without LLVM's
# optimisation passes, with its classic loop emitters instead of the MLIR fusion emitters, and
# each program as one LLVM module (about half the pytest time on 2 cores, same values to the
# tests' tolerances); `make test-all` compiles as every run does.
TEST_XLA_FLAGS := --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false \
	--xla_cpu_parallel_codegen_split_count=1
test: $(STAMP)
	XLA_FLAGS="$(TEST_XLA_FLAGS) $$XLA_FLAGS" $(PYTEST) -m "not slow"

# The full suite (CI): the slow end-to-end runs and the PyTorch comparisons too.
test-all: $(STAMP_BENCH)
	$(PYTEST)

# `make test-compat`: the quick suite (`make test`'s pytest command and XLA flags) in two more
# environments, venvs of their own (gitignored; each is reused until pyproject.toml or its
# constraints change, so delete it to start again, e.g. for newer releases):
#   .venv-lower   Python 3.11 (the lowest requires-python allows) with the lower bound of every
#                 dependency, pinned exactly by constraints/lower-bounds.txt;
#   .venv-newest  the newest Python that pyenv holds, with the newest releases pip resolves.
# XLA aborts the process on a flag it does not know, and newer XLAs drop flags (the XLA of jax
# 0.12 has no --xla_cpu_use_fusion_emitters), so each environment runs with only those of
# TEST_XLA_FLAGS that its XLA knows: each flag is tried alone in a throwaway process first, and
# any left out is named.
VENV_LOWER    ?= .venv-lower
VENV_NEWEST   ?= .venv-newest
PYTHON_LOWER  ?= python3.11
PYTHON_NEWEST ?= $(shell v=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.[0-9]+\.[0-9]+$$' | sort -V | tail -n 1); \
	if [ -n "$$v" ]; then echo "$$(pyenv root)/versions/$$v/bin/python"; else echo python3.13; fi)
COMPAT_PROBE    := import jax.numpy as jnp; jnp.zeros(1).block_until_ready()
COMPAT_VERSIONS := import sys, importlib.metadata as m; print("Python", sys.version.split()[0] + ":", \
	", ".join(p + " " + m.version(p) for p in ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "scipy", "matplotlib", "tqdm")))

$(VENV_LOWER)/.installed: pyproject.toml constraints/lower-bounds.txt
	test -x $(VENV_LOWER)/bin/python || $(PYTHON_LOWER) -m venv $(VENV_LOWER)
	@echo "installing gradattn with its dev extra and the lower bounds of constraints/lower-bounds.txt into $(VENV_LOWER)"
	$(VENV_LOWER)/bin/python -m pip install --quiet -c constraints/lower-bounds.txt -e '.[dev]'
	touch $@

$(VENV_NEWEST)/.installed: pyproject.toml
	test -x $(VENV_NEWEST)/bin/python || $(PYTHON_NEWEST) -m venv $(VENV_NEWEST)
	@echo "installing gradattn with its dev extra and the newest releases of its dependencies into $(VENV_NEWEST)"
	$(VENV_NEWEST)/bin/python -m pip install --quiet --upgrade -e '.[dev]'
	touch $@

test-compat: $(VENV_LOWER)/.installed $(VENV_NEWEST)/.installed
	@status=0; for venv in $(VENV_LOWER) $(VENV_NEWEST); do \
	    py=$$venv/bin/python; flags=; \
	    for f in $(TEST_XLA_FLAGS); do \
	        if XLA_FLAGS=$$f $$py -c '$(COMPAT_PROBE)' 2>&1 | grep -q "Unknown flag in XLA_FLAGS"; then \
	            echo "$$venv: its XLA does not know $$f, left out"; \
	        else flags="$$flags $$f"; fi; \
	    done; \
	    echo "== $$venv: $$($$py -c '$(COMPAT_VERSIONS)')"; \
	    echo "XLA_FLAGS=\"$$flags $$XLA_FLAGS\" $(patsubst $(PY),$$py,$(PYTEST)) -m \"not slow\""; \
	    XLA_FLAGS="$$flags $$XLA_FLAGS" $(patsubst $(PY),$$py,$(PYTEST)) -m "not slow" || status=1; \
	done; exit $$status

# The linter and the type checker (CI runs them before the tests), configured in pyproject.toml;
# both run, and the target fails if either finds anything.
lint: $(STAMP)
	status=0; \
	$(VENV)/bin/ruff check gradattn gradattn_launcher.py tests benchmarks || status=1; \
	$(PY) -m mypy || status=1; \
	exit $$status

run: $(STAMP)
	$(VENV)/bin/gradattn laws-check
	mkdir -p results
	$(VENV)/bin/gradattn em-vs-sgd --seeds $(SEEDS) --steps $(STEPS) \
	    --out results/em_vs_sgd.json --plot results/em_vs_sgd.png

bench: $(STAMP_BENCH)
	$(PY) benchmarks/step_time.py --out-dir benchmarks/measured $(BENCH_ARGS)
	$(PY) benchmarks/experiment_time.py --out-dir benchmarks/measured $(BENCH_ARGS)
	$(PY) benchmarks/seed_scaling.py --out-dir benchmarks/measured $(BENCH_ARGS)
	$(PY) benchmarks/memory.py --out-dir benchmarks/measured $(BENCH_ARGS)
	$(PY) benchmarks/deep_step.py --out benchmarks/measured/deep_step.json $(BENCH_ARGS)
	@# The fused kernel's own benchmark needs a GPU (elsewhere its kernels run interpreted).
	if $(PY) -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then \
	    $(PY) benchmarks/gpu_pallas.py --out-dir benchmarks/measured $(BENCH_ARGS); \
	else echo "benchmarks/gpu_pallas.py: no GPU here, not run"; fi

# The API reference, generated from the docstrings by pdoc into build/docs (not committed).
# pdoc follows a package's __all__, so every public module is named on the command line, each one only
# if no module named before it already brings it in (pdoc warns about repeats); private modules are left out.
DOCS_DIR ?= build/docs

docs: $(STAMP)
	rm -rf $(DOCS_DIR)
	mods="$$($(PY) -c "import functools, pkgutil, gradattn; from pdoc.extract import walk_specs; \
	    mods = ['gradattn'] + sorted(m.name for m in pkgutil.walk_packages(gradattn.__path__, 'gradattn.') if '._' not in m.name); \
	    print(' '.join(functools.reduce(lambda s, m: s if s and m in walk_specs(s) else s + [m], mods, [])))")" && \
	test -n "$$mods" && \
	$(PY) -m pdoc --docformat google --output-directory $(DOCS_DIR) $$mods '!.*\._'
	@echo "API reference: $(DOCS_DIR)/index.html"

clean:
	rm -rf $(VENV) .venv-lower .venv-newest results .pytest_cache build
