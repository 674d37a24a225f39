# dnc_lab: one-command set-up, tests, training and benchmarks.
#   make setup                      CPU build of torch (the default)
#   make setup TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"   for a GPU
#   make bench BENCH_ARGS="--threads 1 --configs a,c"   (see benchmarks/RESULTS.md)
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
# visdom 0.2.4's setup.py imports pkg_resources, gone from setuptools 81: constrain its build
# environment. pip < 26.2 reads PIP_CONSTRAINT there, newer pip PIP_BUILD_CONSTRAINT; keep the
# machine's own constraint file (if any) beside ours.
BUILD_CONSTRAINTS := $(CURDIR)/constraints/build.txt
PIP_ENV := PIP_CONSTRAINT="$(strip $(wildcard /etc/xdg/pip/constraints.txt) $(BUILD_CONSTRAINTS))" \
           PIP_BUILD_CONSTRAINT="$(BUILD_CONSTRAINTS)"

.PHONY: setup assets native test test-fast train bench clean

setup: $(BIN)/dnclab assets native

# Build the native backend's C++ kernels now rather than at the first training step. Without g++
# set-up still completes: backend auto then runs the reference path (and says why).
native: $(BIN)/dnclab
	@$(BIN)/python -m dnc_lab.backends.native || \
	  echo "warning: dnc_lab's native kernels could not be built (see above); install g++ for" \
	       "2-3x faster training. Everything works without them." >&2

$(BIN)/dnclab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(BIN)/pip install --upgrade pip "setuptools<81" wheel
	$(PIP_ENV) $(BIN)/pip install $(TORCH)
	$(PIP_ENV) $(BIN)/pip install -e ".[dev]"
	touch $@

# Visdom fetches its JavaScript from public CDNs at first start; fetch the same files from the
# npm registry instead and put them where visdom looks (must re-run after reinstalling visdom).
# Without npm (and no cached tarballs) set-up still completes: training works, and the dashboard
# waits until `make assets` succeeds.
assets: $(BIN)/dnclab
	@$(BIN)/python -m dnc_lab.viz.assets install || \
	  echo "warning: Visdom's offline assets are not installed (see above). Training works;" \
	       "for the dashboard install npm, then run 'make assets'." >&2

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

train: setup
	$(BIN)/dnclab train configs/copy.yaml

bench: setup
	$(PIP_ENV) $(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/bench_speed.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
