# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   -> set up .venv, prepare the demo data, train MIND, evaluate it with Milvus Lite
#   make test   -> set up .venv (with test tools) and run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
MODELS := models

.PHONY: install install-dev demo test lint bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version.split()[0]'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps paddle-serving-server==0.9.0
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install-dev: $(VENV)/.installed-dev

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

demo: install
	$(BIN)/paddlerec-milvus prepare-data --input $(MODELS)/mind/data/demo_clicks.csv.gz \
		--output $(MODELS)/mind/data/demo --overwrite
	cd $(MODELS) && ../$(BIN)/python -u trainer.py -m mind/config.yaml
	cd $(MODELS) && ../$(BIN)/python -u infer.py -m mind/config.yaml -top_n 50
	$(BIN)/paddlerec-milvus export -m $(MODELS)/mind/config.yaml --output output/export
	@echo "next: .venv/bin/paddlerec-milvus api   (REST API + demo page on http://127.0.0.1:8000)"

test: install-dev
	$(BIN)/python -m pytest

lint: install-dev
	$(BIN)/ruff check .

# The load section's HTTP closed loop runs `wrk` (Debian's package; `hey` is the fallback),
# installed here when missing.
bench: install-dev
	@if ! command -v wrk >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; fi
	$(BIN)/python -m benchmarks

gpu-check: install
	bash scripts/gpu_check.sh

clean:
	rm -rf $(MODELS)/mind/output_model_mind* $(MODELS)/mind/output_milvus
