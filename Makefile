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

.PHONY: venv test test-all lint run bench docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The dev extra and the bench extra (torch, for the comparisons with the PyTorch reference).
$(STAMP_BENCH): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
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
	rm -rf $(VENV) results .pytest_cache build
