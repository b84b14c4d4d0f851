# The project's environment is .venv/ at the repository root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
# The runtime image's name; deploy/kubernetes and deploy/kserve reference the same tag (tests check it).
IMAGE := localhost/torchserve-xai:0.1.0

.PHONY: image test serve model-store monitor evaluate soak bench bench-quick system-deps clean

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
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

# Trains the demo model if its cached weights are missing or stale, then archives it if needed.
model-store: $(STAMP)
	$(PY) -m serving_tools.demo_store

# TorchServe in the foreground on 127.0.0.1:8080/8081/8082 (TS_*_ADDRESS override); Ctrl-C stops it.
serve: model-store
	bash deploy/install-system-deps.sh java
	$(PY) -m serving_tools.serve --model-store model_store --models shapes=shapes.mar \
	  --config deploy/torchserve/local.properties --example-image docs/examples/circle.png

# Prometheus in the foreground, scraping TS_METRICS_ADDRESS (default 127.0.0.1:8082).
monitor:
	bash deploy/monitor.sh

# Explanation quality of every explainer on the demo model (trains it first if needed):
# reports/quality.{json,md,png}; about 2.5 minutes on two cores.
evaluate: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m explainers.evaluation.report --out reports

# A real TorchServe with the demo model under 3000 mixed requests at concurrency 6: no unexpected
# 5xx, worker memory growth under 10 % after warm-up (a 300-request version runs in make test).
soak: model-store
	bash deploy/install-system-deps.sh java
	OMP_WAIT_POLICY=PASSIVE $(PY) -m serving_tools.soak --json reports/soak.json

# Performance goals side by side (~10-12 min on 2 cores); table on stdout, benchmarks/results/latest.json.
bench: $(STAMP)
	bash deploy/install-system-deps.sh java wrk
	OMP_WAIT_POLICY=PASSIVE $(PY) -m benchmarks.run

bench-quick: $(STAMP)
	bash deploy/install-system-deps.sh java wrk
	OMP_WAIT_POLICY=PASSIVE $(PY) -m benchmarks.run --quick

# The runtime image (deploy/container/Containerfile) with podman/buildah; ROOTFS=DIR builds on a
# debootstrap root filesystem instead of pulling BASE (see deploy/container/build-image.sh).
image: $(STAMP)
	bash deploy/install-system-deps.sh image
	IMAGE=$(IMAGE) PY=$(PY) bash deploy/container/build-image.sh $(if $(ROOTFS),--rootfs $(ROOTFS))

clean:
	rm -rf $(VENV) model_store/*.mar run
