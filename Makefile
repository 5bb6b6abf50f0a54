# The README's two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-paired docs-pictures test install lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --editable '.[dev,demo]'
	touch $@

# The main job on the embedded demo data (see README "Demo").
demo: $(STAMP)
	$(PY) tools/demo.py --out demo_out

# Paired image + mask synthesis on the same demo data, judged by segmentation (README).
demo-paired: $(STAMP)
	$(PY) tools/demo.py --out demo_out --paired

# The README's pictures under docs/, from the demos' outputs (each demo runs first if needed).
docs-pictures: $(STAMP)
	$(PY) tools/demo.py --out demo_out --docs docs
	$(PY) tools/demo.py --out demo_out --paired --docs docs

# The whole test suite, with the project's real two-node SLURM cluster booted around it.
test: $(STAMP)
	slurm/testcluster.sh install
	slurm/testcluster.sh up
	status=0; $(PY) -m pytest $(PYTEST_ARGS) || status=$$?; \
	  slurm/testcluster.sh down; exit $$status

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf demo_out .pytest_cache
