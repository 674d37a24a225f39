# dnc_lab: one-command set-up, tests, training and benchmarks.
#   make setup                      CPU build of torch (the default)
#   make setup TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"   for a GPU
#   make bench BENCH_ARGS="--threads 1 --configs a,c"   (see benchmarks/RESULTS.md)
#   make gpu-wheels                 here (with network): wheels for a GPU machine without network
#   make gpu-check                  there: install (its own torch untouched), CUDA tests, benchmark
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

.PHONY: setup assets native test test-fast train bench gpu-wheels gpu-check clean

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

# The GPU machine: Python 3.12 with its own CUDA torch and Triton, possibly no network. gpu-wheels
# downloads, here, Python-3.12 wheels of everything else the checks import (gpu_check.py installs
# only those that machine lacks, each with --no-deps) and builds visdom 0.2.4's (an sdist only).
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= benchmarks/results/gpu-check.md
GPU_PLATFORMS := $(foreach n,2_28 2_27 2_17 2_5,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64 \
                 --platform manylinux1_x86_64 --platform any
VISDOM_0_3_NPM := jquery@3.1.1 bootstrap@3.3.7 react@16.2.0 react-dom@16.2.0 react-modal@3.1.10 \
  plotly.js-dist-min@2.11.1 sjcl@1.0.7 layout-bin-packer@1.4.0 d3@3.5.17 d3-selection-multi@1.0.1 \
  save-svg-as-png@1.4.17 react-resizable@3.1.3 react-grid-layout@2.2.3 classnames@2.2.5 mathjax@3.2.2
gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	$(PIP_ENV) $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(GPU_PLATFORMS) -d $(GPU_WHEELS) click pyyaml tqdm "tornado>=6.1,<6.6" requests urllib3 idna \
	  charset-normalizer certifi jsonpatch jsonpointer websocket-client pytest pytest-timeout iniconfig \
	  pluggy packaging dnc==1.1.0
	$(PIP_ENV) $(PYTHON) -m pip wheel -q --no-deps -w $(GPU_WHEELS) visdom==0.2.4
	# visdom 0.3.0 (Python >= 3.12 only) and the npm packages of its JavaScript, for gpu-check's
	# dashboard tests on that Python; kept apart so that the install phase sees one visdom.
	$(PIP_ENV) $(PYTHON) -m pip download -q --no-deps --no-binary=:all: --python-version 3.12 \
	  -d $(GPU_WHEELS)/visdom-0.3 visdom==0.3.0
	$(PIP_ENV) $(PYTHON) -m pip wheel -q --no-deps --ignore-requires-python -w $(GPU_WHEELS)/visdom-0.3 $(GPU_WHEELS)/visdom-0.3/visdom-0.3.0.tar.gz
	rm -f $(GPU_WHEELS)/visdom-0.3/visdom-0.3.0.tar.gz
	mkdir -p $(GPU_WHEELS)/visdom-npm
	cd $(GPU_WHEELS)/visdom-npm && npm pack --silent $(VISDOM_0_3_NPM) >/dev/null
	@du -sh $(GPU_WHEELS)

# Run on the GPU machine, from the repository root (with .gpu-wheels beside it if it has no network).
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --wheels $(GPU_WHEELS) --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
