# The two commands of the README: `make run` and `make test`. Both set everything up on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench dense-study sequences-study clean

install: $(STAMP)

# The package build compiles the C++ CPU kernel against torch: the build requirements of pyproject.toml go into the
# venv first and the package builds there without isolation (an isolated build would download torch a second time).
# An edited kernel source makes the next `make` rebuild it (an editable install does not recompile by itself).
$(STAMP): pyproject.toml setup.py $(wildcard src/convplus/backends/csrc/*)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $$($(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"])')
	$(PY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	touch $(STAMP)

run: install
	$(PY) -m convplus.train.compare

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --durations=15

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# NATTEN, a peer in the speed suite: its sdist builds without CUDA kernels where no GPU is found (it needs the
# installed torch to build, hence no build isolation).
bench: install
	$(PY) -m pip install --quiet --no-build-isolation --no-deps natten==0.21.7
	$(PY) benchmarks/run.py
	$(PY) benchmarks/local_vs_reference.py
	$(PY) benchmarks/model_table.py

# Conv+ vs ConvNeXt V2 atto backbones for detection and segmentation on synthetic:shapes, 3 seeds: docs/dense.md.
dense-study: install
	$(PY) benchmarks/dense.py --seeds 3 --output docs/dense.md

# Conv+ vs transformer vs conv byte-level LMs on the Python standard library (3 seeds, equal CPU time), their
# inference cost against sequence length, and Conv+ vs conv video networks on moving digits: docs/sequences.md.
# Its time follows from its budgets (9 LM runs of 120 s, 6 video runs of 60 s, capped sweeps): run it alone.
sequences-study: install
	$(PY) benchmarks/sequences.py --seeds 3 --output docs/sequences.md

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/convplus/backends/_cpu_kernels*.so
