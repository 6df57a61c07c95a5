# farebox: two commands.  `make demo` runs the whole system on this machine; `make test` runs the tests.
# Works on a fresh Debian 12 with python3 (3.11) as root; nothing to install by hand.

SHELL       := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS   += --no-print-directory

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.farebox-installed
PCSC_H  := /usr/include/PCSC/winscard.h
CJK_TTF := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc
SUDO    := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: help venv demo test soak bench clean

help:
	@echo "make demo    run the simulated fleet and back office (embedded broker and SQLite, nothing to set up)"
	@echo "make test    make sure PostgreSQL, Mosquitto and pcscd (with vpcd readers) run, then run all tests"
	@echo "make soak    the long reliability runs (2M fuzzed messages, vpcd soak, bigger outage/broker/garbage/ingest-kill runs)"
	@echo "make bench   run the benchmarks (each beside its baseline)"
	@echo "make venv    create .venv and install farebox with its test extras"
	@echo "make clean   remove var/ and caches (keeps .venv)"

venv: $(STAMP)
	@:

# pyscard has no Linux wheel: it compiles (gcc, Python.h) against winscard.h from libpcsclite-dev.
# A bare Debian 12 also lacks python3-venv (ensurepip). Settlement PDFs embed a CJK font (fonts-wqy-microhei).
# The checks run only when the stamp is stale;
# reinstall only when pyproject.toml is newer than the stamp, so repeat runs cost nothing.
$(STAMP): pyproject.toml
	@pkgs=""; \
	[ -f $(PCSC_H) ] || pkgs="$$pkgs libpcsclite-dev"; \
	[ -f $(CJK_TTF) ] || pkgs="$$pkgs fonts-wqy-microhei"; \
	[ -x $(BIN)/python ] || $(PYTHON) -c 'import ensurepip' 2>/dev/null || pkgs="$$pkgs python3-venv"; \
	command -v gcc >/dev/null || pkgs="$$pkgs gcc"; \
	$(PYTHON) -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
	  || pkgs="$$pkgs python3-dev"; \
	if [ -n "$$pkgs" ]; then \
	  echo "venv: apt-get install$$pkgs"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -q $$pkgs >/dev/null \
	    || { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $$pkgs >/dev/null; }; \
	fi
	@if [ ! -x $(BIN)/python ]; then \
	  echo "venv: creating $(VENV)"; \
	  $(PYTHON) -m venv $(VENV); \
	fi
	@echo "venv: pip install -e '.[test]'"
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

demo: venv
	$(BIN)/farebox demo

# scripts/ensure-services.sh installs/starts PostgreSQL, Mosquitto and pcscd with farebox's vsmartcard vpcd readers
# (apt: pcscd vsmartcard-vpcd opensc pcsc-tools libpcsclite-dev), or says why it cannot.
# pytest's exit status goes straight to make: 5 ("no tests collected") fails the target too.
# --durations: the slowest tests are named at the end of every run, so the suite's time can be kept in check.
test: venv
	@scripts/ensure-services.sh
	$(BIN)/pytest -q -p no:cacheprovider --durations=25 $(PYTEST_ARGS)

# The long variants of the reliability tests (about 40-50 minutes here); `make test` runs the short ones.
soak: venv
	@scripts/ensure-services.sh
	FAREBOX_WIRE_FUZZ=2000000 $(BIN)/pytest -q -p no:cacheprovider tests/reliability/test_wire_fuzz.py
	FAREBOX_VPCD_SOAK=1000 $(BIN)/pytest -q -p no:cacheprovider tests/integration/test_vpcd_soak.py
	FAREBOX_SOAK=1 FAREBOX_OTA_EXAMPLES=1000 $(BIN)/pytest -q -p no:cacheprovider tests/integration/test_topup_attacks.py -k stateful
	FAREBOX_SOAK=1 $(BIN)/pytest -q -s -p no:cacheprovider tests/reliability/test_fleet_life.py -k working_life
	FAREBOX_SOAK=1 $(BIN)/pytest -q -p no:cacheprovider tests/reliability/test_outage.py \
	  tests/reliability/test_broker_restart.py tests/reliability/test_live_garbage.py \
	  tests/reliability/test_ingest_workers.py tests/reliability/test_clearing_race.py \
	  tests/integration/test_new_company.py
	FAREBOX_SOAK=1 $(BIN)/pytest -q -s -p no:cacheprovider tests/reliability/test_cluster_failures.py
	FAREBOX_NATS_VALIDATORS=500 $(BIN)/pytest -q -s -p no:cacheprovider tests/integration/test_nats_cluster.py -k loses
	FAREBOX_SOAK=1 $(BIN)/pytest -q -p no:cacheprovider tests/e2e/test_demo_city.py
	FAREBOX_SOAK=1 $(BIN)/pytest -q -s -p no:cacheprovider tests/integration/test_partition_migration.py -k upgrade_moves

bench: venv
	$(BIN)/python -m bench

clean:
	@echo "clean: var/ and caches (.venv kept)"
	@rm -rf var .pytest_cache .ruff_cache .mypy_cache .hypothesis build
	@find . -path ./$(VENV) -prune -o -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
