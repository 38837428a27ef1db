# The two commands: `make demo` and `make test` do all set-up (idempotent, quiet when done).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test lint image clean

install:
	@bash scripts/install.sh

demo: install
	@$(VENV)/bin/hearth demo

# Three pytest processes at once (cluster + security, functions + charts + controller, the rest):
# see docs/testing.md.
test: install
	@$(PY) scripts/run_tests.py $(PYTEST_ARGS)

# The one container image (localhost/hearth:<version>), built with podman from a local
# debootstrap base; quiet when current. The cluster tests build it themselves when needed.
image: install
	@bash scripts/image.sh

lint: install
	@$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	@bash scripts/image.sh clean
	rm -rf $(VENV) .tools build *.egg-info
