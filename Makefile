# Set-up and checks. `make test` and `make demo` work on a fresh machine: they create .venv,
# install bioconf with all extras (dev/CI pins in constraints/cpu.txt) and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints/cpu.txt
# Reinstall only when the package metadata or the pins change.
STAMP := $(VENV)/.installed

.PHONY: install test fuzz lint demo bench schema-table clean bionemo-env bionemo-env-or-say-why

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) --config-settings editable_mode=compat -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check bioconf tests benchmarks tools examples
	$(VENV)/bin/ruff format --check bioconf tests benchmarks tools examples

# The editor page's browser test drives Debian's chromium: Playwright's own browser downloads are not
# reachable from CI. Installed once (as root); a failed install stops `make test` rather than skip the test.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

test: lint $(CHROMIUM) bionemo-env-or-say-why
	$(PY) -m pytest -n 2 -q

# tests/test_bionemo.py runs BioNeMo's own code from .venv-bionemo; where it cannot be installed (no
# package index, no BioNeMo sources) those tests skip with that reason, and this says why here.
bionemo-env-or-say-why:
	@$(MAKE) --no-print-directory bionemo-env || echo "make bionemo-env failed: tests/test_bionemo.py will skip"

# The adversarial suite for longer: every fuzz test draws FUZZ_SCALE times its CI examples, fresh
# random inputs each run (make test runs them derandomized, at scale 1).
FUZZ_SCALE ?= 50
fuzz: $(STAMP)
	BIOCONF_FUZZ_SCALE=$(FUZZ_SCALE) $(PY) -m pytest -n 2 -q tests/test_hostile_documents.py \
		tests/test_hostile_checkpoints.py tests/test_service_hostile.py tests/test_corrupted_weights.py \
		tests/test_json_schema.py

# Fine-tunes a small ESM-2-like checkpoint (created once under checkpoints/) and prints the report.
demo: $(STAMP)
	$(VENV)/bin/bioconf demo

# Each script prints its tables; the rows of the speed targets are collected and printed last.
BENCH_RECORD := $(CURDIR)/.bench-targets.jsonl
bench: $(STAMP)
	rm -f $(BENCH_RECORD)
	cd benchmarks && for script in schema_speed checkpoint_config_speed weights_speed service_load; do \
		BIOCONF_BENCH_RECORD=$(BENCH_RECORD) ../$(PY) $$script.py || exit 1; done
	cd benchmarks && ../$(PY) summary.py $(BENCH_RECORD)

# Regenerate bioconf/schema/megatron_fields.py from the installed megatron-core.
schema-table: $(STAMP)
	$(PY) tools/generate_fields.py

# A SEPARATE virtualenv with NVIDIA BioNeMo's own code for tests/bionemo_env/ (reference checkpoints
# written by BioNeMo; BioNeMo reading back what bioconf writes). bioconf is NOT installed there.
# bionemo-llm/-core 2.4.5 come from the package index, every package pinned by constraints/bionemo.txt
# (same torch/megatron-core/fiddle/nemo-toolkit as cpu.txt; why not cpu.txt itself: see that file).
# The ESM-2 and Geneformer sub-packages are not on the index: --no-deps from $(BIONEMO_SOURCES).
# CPU only: Transformer Engine and apex need CUDA; tests/bionemo_env/bionemo_runtime.py explains the
# in-process stand-ins the scripts use instead (nothing of them is installed into the venv).
BIONEMO_VENV ?= .venv-bionemo
BIONEMO_SOURCES ?= $(firstword $(wildcard ../shared/bionemo /work/shared/bionemo) ../shared/bionemo)
BIONEMO_STAMP := $(BIONEMO_VENV)/.installed
BIONEMO_SUBPACKAGES := $(BIONEMO_SOURCES)/bionemo-esm2 $(BIONEMO_SOURCES)/bionemo-geneformer

$(BIONEMO_STAMP): constraints/bionemo.txt $(addsuffix /pyproject.toml,$(BIONEMO_SUBPACKAGES))
	test -x $(BIONEMO_VENV)/bin/python || $(PYTHON) -m venv $(BIONEMO_VENV)
	$(BIONEMO_VENV)/bin/python -m pip install --quiet -c constraints/bionemo.txt \
		torch==2.13.0 "nemo-toolkit[nlp]==2.7.3" megatron-core==0.16.1 bionemo-llm==2.4.5 bionemo-core==2.4.5
	$(BIONEMO_VENV)/bin/python -m pip install --quiet --no-deps $(BIONEMO_SUBPACKAGES)
	touch $@

bionemo-env: $(BIONEMO_STAMP)

clean:
	rm -rf $(VENV) $(BIONEMO_VENV) .pytest_cache .ruff_cache .hypothesis $(BENCH_RECORD)
