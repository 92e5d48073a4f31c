PYTHON ?= python3

.PHONY: install run test lint format bench

install:            ## install peftlab, its test dependencies and the bundled models
	PYTHON=$(PYTHON) bash scripts/install.sh

run: install        ## the main job on the bundled defaults (see README for what to expect)
	peftlab compare --quick

test: install       ## the whole test suite
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

lint:
	$(PYTHON) -m ruff check peftlab tests benchmarks
	$(PYTHON) -m ruff format --check peftlab tests benchmarks

format:
	$(PYTHON) -m ruff format peftlab tests benchmarks
	$(PYTHON) -m ruff check --fix peftlab tests benchmarks
