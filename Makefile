# geoinvert: `make demo` runs the default case, `make test` runs the test suite
# (`make test-fast` leaves out the tests marked slow).
# Both install what is missing first (Debian packages, .venv, torch, the package).

VENV    ?= .venv
PY      := $(VENV)/bin/python
MPIRUN  := timeout 900 mpirun $(shell [ "$$(id -u)" = 0 ] && echo --allow-run-as-root) --oversubscribe
PYTEST  := OMP_NUM_THREADS=1 $(PY) -m pytest -p no:cacheprovider
CASE    ?= cases/default.yaml
OUT     ?= results/default.nc

.PHONY: setup demo test test-fast test-serial test-mpi bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/geoinvert run $(CASE) --out $(OUT)

test: setup
	$(MAKE) --no-print-directory test-serial test-mpi

test-fast: setup
	$(PYTEST) -q -m "not slow" tests

test-serial:
	$(PYTEST) -q tests

test-mpi:
	$(MPIRUN) -n 2 env OMP_NUM_THREADS=1 $(PY) -m pytest -p no:cacheprovider -q -m mpi tests

bench: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/forward.py

clean:
	rm -rf results .pytest_cache build *.egg-info
