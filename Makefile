# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test demo parity proto clean

$(STAMP): pyproject.toml setup.py $(wildcard proto/baichuan_audio/v1/*.proto)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "setuptools>=68" wheel "grpcio-tools==1.85.1"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	@touch $@

install: $(STAMP)

# The whole suite against a private redis-server on a free port (started and stopped here).
test: $(STAMP)
	$(PY) -m services.common.redis_server -- $(PY) -m pytest -q $(PYTEST_ARGS)

# Only the golden-fixture parity tests.
parity: $(STAMP)
	$(PY) -m pytest -q -k parity $(PYTEST_ARGS)

# One spoken turn through the whole local stack (see README).
demo: $(STAMP)
	$(VENV)/bin/baichuan-audio demo

proto: $(STAMP)
	$(PY) -c "from services.common.protogen import generate; generate()"

clean:
	rm -rf baichuan_audio build *.egg-info .pytest_cache
