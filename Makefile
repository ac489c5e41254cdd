# make demo | make test | make setup   (VENV=/path/to/venv to use another virtualenv)
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DEMO_IMAGE ?= demo/cat.jpg

.PHONY: setup setup-test test demo

setup:
	VENV="$(VENV)" bash scripts/setup_env.sh

setup-test:
	VENV="$(VENV)" bash scripts/setup_env.sh --test

test: setup-test
	$(PYTHON) -m pytest -q tests

demo: setup
	$(PYTHON) tools/classify.py $(DEMO_IMAGE)
