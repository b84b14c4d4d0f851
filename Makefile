# The project's environment is .venv/ at the repository root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: test serve system-deps clean

# torch is installed from its pin before anything that depends on it, so no CUDA wheels are pulled.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

system-deps:
	bash deploy/install-system-deps.sh

test: $(STAMP) system-deps
	$(PY) -m pytest -q

serve: $(STAMP)
	@echo "make serve: the TorchServe handler is not built yet (issue 3)" >&2; exit 1

clean:
	rm -rf $(VENV) model_store/*.mar run
