# Set-up and test entry points. Everything a test needs is installed here, into .venv.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Ray must bind to loopback only (tests may only talk to 127.0.0.1).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
# DeepSpeed JIT-builds its shm op once; keep the cache inside the repo so CI reuses it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_BUILD_OPS := 0

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch from the local wheel first: nothing later may replace it with a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[all,test]'
	$(PY) -c "import torch; assert torch.version.cuda is None, 'a CUDA torch was installed: ' + torch.__version__; print('torch', torch.__version__)"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/gq demo

clean:
	rm -rf $(VENV) .cache gq-demo-out
