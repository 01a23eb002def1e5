# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install system-deps test demo parity proto clean

# redis-server (tests and demo start their own) and venv support, from Debian's packages
# when missing and we may install them.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	$(PYTHON) -c "import ensurepip, venv" >/dev/null 2>&1 || missing="$$missing $(PYTHON)-venv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "please install:$$missing (e.g. sudo apt-get install$$missing)"; exit 1; fi; \
	fi

$(STAMP): pyproject.toml setup.py $(wildcard proto/baichuan_audio/v1/*.proto)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "setuptools>=68" wheel "grpcio-tools==1.85.1"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	@touch $@

install: system-deps $(STAMP)

# The whole suite against a private redis-server on a free port (started and stopped here).
test: install
	$(PY) -m services.common.redis_server -- $(PY) -m pytest -q $(PYTEST_ARGS)

# Only the golden-fixture parity tests.
parity: install
	$(PY) -m pytest -q -k parity $(PYTEST_ARGS)

# One spoken turn through the whole local stack (see README).
demo: install
	$(VENV)/bin/baichuan-audio demo

proto: install
	$(PY) -c "from services.common.protogen import generate; generate()"

clean:
	rm -rf baichuan_audio build *.egg-info .pytest_cache
