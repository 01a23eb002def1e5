# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install system-deps test-deps test demo parity parity-kernels proto clean

# Debian packages, installed when missing and we may (root with apt-get), else named.
# Serving needs redis-server (tests and demo start their own) and venv support; the tests also
# need espeak-ng (the evaluation tests speak their questions) and chromium (the voice page's
# browser test).
define apt_need
	@missing=""; \
	for c in $(1); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	$(PYTHON) -c "import ensurepip, venv" >/dev/null 2>&1 || missing="$$missing $(PYTHON)-venv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "please install:$$missing (e.g. sudo apt-get install$$missing)"; exit 1; fi; \
	fi
endef

system-deps:
	$(call apt_need,redis-server)

test-deps:
	$(call apt_need,redis-server espeak-ng chromium)

$(STAMP): pyproject.toml setup.py $(wildcard proto/baichuan_audio/v1/*.proto)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "setuptools>=68" wheel "grpcio-tools==1.85.1"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	@touch $@

install: system-deps $(STAMP)

# The whole suite against a private redis-server on a free port (started and stopped here),
# then the parity tests again on other CPU kernels (see parity-kernels).
test: test-deps install
	$(PY) -m services.common.redis_server -- $(PY) -m pytest -q $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory parity-kernels

# Only the golden-fixture parity tests.
parity: install
	$(PY) -m pytest -q -k parity $(PYTEST_ARGS)

# The parity tests on the kernels other CPUs run: ATen's scalar (default) and AVX2 paths, with
# oneDNN and MKL held to the same instruction sets. A tolerance that only holds on this CPU's
# kernels fails here instead of on a user's machine.
PORTABLE_KERNELS = "ATEN_CPU_CAPABILITY=default DNNL_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2" \
                   "ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
parity-kernels: install
	@for kernels in $(PORTABLE_KERNELS); do \
	  env $$kernels $(PY) -c "import torch; print('parity tests on torch CPU capability', \
	    torch.backends.cpu.get_cpu_capability(), 'with', '$$kernels')"; \
	  env $$kernels $(PY) -m pytest -q -p no:cacheprovider -k parity $(PYTEST_ARGS) || exit 1; \
	done

# One spoken turn through the whole local stack (see README).
demo: install
	$(VENV)/bin/baichuan-audio demo

proto: install
	$(PY) -c "from services.common.protogen import generate; generate()"

clean:
	rm -rf baichuan_audio build *.egg-info .pytest_cache
