# Two commands on a fresh machine: `make serve` and `make test`. Both install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
MODEL ?= smollm2-135m

.PHONY: install serve chat test test-ray clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/tokenmill serve --model $(MODEL)

chat: install
	$(VENV)/bin/tokenmill chat --model $(MODEL)

test: install
	$(PY) -m pytest -q -m "not ray"

# Replicas on Ray Serve (tests/scale): installs the `ray` extra first, about 400 MB and 35 s.
test-ray: install
	$(PY) -m pip install -q --disable-pip-version-check -e '.[ray]'
	$(PY) -m pytest -q -m ray tests/scale

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
