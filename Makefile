# Every target installs what it needs into .venv on first use (a fresh machine needs only python3.11).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The embedded sample (scikit-learn's digits) and where its outputs go.
SAMPLE_DIR ?= data/sample/digits
INPUT ?= $(SAMPLE_DIR)/all_data.csv
LABELS ?= $(if $(findstring $(SAMPLE_DIR),$(INPUT)),$(SAMPLE_DIR)/dict.txt,)
FORM ?= jpeg
OUTPUT ?= data/out/$(FORM)
RUNNER ?= DirectRunner
IMAGE_SIZE ?= 32
EMBEDDING_MODULE ?=
ETL_FLAGS ?=

.PHONY: help install sample etl demo test bench-etl clean

help:
	@echo "make demo   - install, make the sample, run the ETL end to end"
	@echo "make test   - install, run the tests"
	@echo "make etl FORM=jpeg|pixels|embeddings [INPUT= OUTPUT= RUNNER= IMAGE_SIZE= EMBEDDING_MODULE=]"
	@echo "make bench-etl - ETL throughput and memory against this machine's decode+resize limit"

install: $(STAMP)

$(STAMP): setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

$(SAMPLE_DIR)/all_data.csv: | $(STAMP)
	$(PY) -m etl.sample --output $(SAMPLE_DIR)

sample: $(SAMPLE_DIR)/all_data.csv

etl: $(STAMP) $(if $(findstring $(SAMPLE_DIR),$(INPUT)),sample,)
	$(PY) -m etl --input $(INPUT) $(if $(LABELS),--labels $(LABELS),) --output $(OUTPUT) --form $(FORM) \
	    --image_size $(IMAGE_SIZE) $(if $(EMBEDDING_MODULE),--embedding_module $(EMBEDDING_MODULE),) \
	    --runner $(RUNNER) --overwrite $(ETL_FLAGS)

demo: sample
	$(MAKE) etl FORM=jpeg
	$(MAKE) etl FORM=pixels

test: $(STAMP)
	$(PY) -m pytest -q tests

bench-etl: $(STAMP)
	$(PY) -m etl.bench

clean:
	rm -rf data/out runs .pytest_cache
