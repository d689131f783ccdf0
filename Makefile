# make test : create/refresh .venv (pinned CPU torch first, then the project) and run the test suite
# make demo : the whole text-to-image pipeline, small, on CPU -> outputs/demo/report.md (see README)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu

.PHONY: test demo venv clean

venv: $(VENV)/.installed

# Torch first, from the constraints file: a bare torch requirement would pull the CUDA build (several GB).
$(VENV)/.installed: constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

# Two workers, each test file on one of them (its module fixtures made once): the suite is mostly waiting on
# subprocesses that use one core each.
test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: venv
	$(PY) -m t2i.demo --out outputs/demo

clean:
	rm -rf $(VENV) runs outputs
