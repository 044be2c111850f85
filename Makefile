# make demo: quick-start study on CPU (< 3 min); make test: ruff, the whole suite, then the API docs
# in strict mode; make docs: the API reference alone, into docs/_build/html.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Multi-device code is exercised on CPU through forced host devices.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false
export JAX_PLATFORMS ?= cpu

.PHONY: demo test docs install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.shuffling_rates --config configs/shuffling_rates.py:quick

# --dist loadfile keeps each test file on one worker, so that a module's fixture (most run a
# quick study) is set up once rather than once on each worker.
# pytest exits 5 when it collects nothing: report that as its own failure, never as a pass.
# The docs step is strict: -n reports every unresolved cross-reference, -W fails the build on
# any warning (Sphinx >= 8.1 lists them all first), and -E rereads every page so that an
# incremental build cannot skip the warnings of an unchanged one.
test: $(STAMP)
	$(BIN)/ruff check .
	@$(BIN)/python -m pytest -n 2 --dist loadfile --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)"; fi; \
	exit $$rc
	$(BIN)/python -m sphinx -b html -E -n -W -q docs docs/_build/html

docs: $(STAMP)
	$(BIN)/python -m sphinx -b html -n -q docs docs/_build/html
	@echo "make docs: open docs/_build/html/index.html"

# grab-sampler 0.1.3 goes in without its dependencies: it requires torch-sparse, a C++ source
# build of ~15 min here that also needs the undeclared torch-scatter (another source build),
# yet uses it only in a random projection that the benchmark never selects (which stubs it).
# k-diffusion 0.1.1.post1 goes in without its dependencies too: its package __init__ imports its
# training stack (torchvision, clean-fid, clip-anytorch, kornia, wandb, accelerate, ...), and no
# torchvision wheel on the index works with torch 2.13.0+cpu (0.28.0's C ops fail to register,
# 0.29 wants torch 2.14). benchmarks/sde_samplers.py loads k_diffusion/sampling.py alone under a
# bare package (needing scipy, tqdm, torchsde, torchdiffeq) and stands in utils.append_dims.
# It runs on one core with the default XLA flags: see its docstring.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m pip install --quiet --no-deps grab-sampler==0.1.3 k-diffusion==0.1.1.post1
	$(BIN)/python -m benchmarks.shuffling_overhead
	$(BIN)/python -m benchmarks.ef21_step
	$(BIN)/python -m benchmarks.mcmc_ess
	$(BIN)/python -m benchmarks.sweep_scaling
	XLA_FLAGS= taskset -c 0 $(BIN)/python -m benchmarks.sde_samplers
	XLA_FLAGS= taskset -c 0 $(BIN)/python -m benchmarks.train_throughput

clean:
	rm -rf $(VENV) results .pytest_cache docs/_build
