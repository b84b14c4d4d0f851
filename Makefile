# The project's environment is .venv/ at the repository root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A released pair: torchvision and timm models run with it. The wheels carry CUDA libraries and run on CPU.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# The runtime image's name; deploy/kubernetes and deploy/kserve reference the same tag (tests check it).
IMAGE := localhost/torchserve-xai:0.1.0

.PHONY: image test test-fast serve serve-kserve view model-store monitor evaluate soak bench bench-quick system-deps clean

VIEW_PORT ?= 8090
# What `make serve` and `make serve-kserve` load from model_store/: NAME=FILE.mar, space-separated.
SERVE_MODELS ?= shapes=shapes.mar

# torch is installed from its pin before anything that depends on it, so nothing pulls another torch.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

system-deps:
	bash deploy/install-system-deps.sh

# In-process tiers on this many pytest-xdist workers, a test file per worker at a time. Their tests
# keep about one core busy (Python-bound tracing and small tensors), so two workers on two cores
# nearly halve them; the largest models file keeps to one worker, which bounds memory.
TEST_WORKERS ?= 2
PYTEST := OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

# Every tier: tests/unit, tests/service and tests/models in parallel, then tests/e2e (real TorchServe,
# Prometheus, ...) alone, since its load and timing checks must not share the cores. Both phases
# always run; the target fails if either did.
test: $(STAMP) system-deps
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile -m "unit or service or models"; in_process=$$?; \
	$(PYTEST) -m "e2e and not image"; e2e=$$?; \
	echo "in-process tiers: exit $$in_process; e2e tier: exit $$e2e"; \
	test $$in_process -eq 0 -a $$e2e -eq 0

# The library and the service in-process, no server (a few minutes on 2 cores).
test-fast: $(STAMP)
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile -m "unit or service"

# Trains the demo model if its cached weights are missing or stale, then archives it if needed.
model-store: $(STAMP)
	$(PY) -m tools.demo_store

# TorchServe in the foreground on 127.0.0.1:8080/8081/8082 (TS_*_ADDRESS override); Ctrl-C stops it.
serve: model-store
	bash deploy/install-system-deps.sh java
	$(PY) -m tools.serve --model-store model_store --models $(SERVE_MODELS) \
	  --config deploy/torchserve/local.properties --example-image docs/examples/circle.png

# TorchServe as for `make serve` (TS_*_ADDRESS, token auth on) behind the Open Inference Protocol
# front server (package oip): REST on 127.0.0.1:${OIP_HTTP_PORT:-8088}, gRPC on ${OIP_GRPC_PORT:-8089}.
# Ctrl-C stops both. docs/explanations-as-tensors.md has the protocol.
serve-kserve: model-store
	bash deploy/install-system-deps.sh java
	$(PY) -m tools.serve_kserve --model-store model_store --models $(SERVE_MODELS) \
	  --config deploy/torchserve/local.properties --example-image docs/examples/circle.png

# The explanation viewer on 127.0.0.1:$(VIEW_PORT), to use beside `make serve`, whose config allows
# the origin http://127.0.0.1:8090 only. Standard library only, so no venv is needed.
view:
	python3 -m tools.view --port $(VIEW_PORT)

# Prometheus in the foreground, scraping TS_METRICS_ADDRESS (default 127.0.0.1:8082).
monitor:
	bash deploy/monitor.sh

# Explanation quality of every explainer on both demo models (trains them first if needed):
# reports/quality.{json,md,png} (AllConvNet) and reports/quality-maxpool.* (MaxPoolNet), a few
# minutes on two cores. Any other model: make evaluate EVALUATE_ARGS="--mar path.mar" (or
# "--torchvision resnet50 --weights w.pt", "--timm convnext_tiny"); see tools/quality_report.py.
EVALUATE_ARGS ?=
evaluate: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m tools.quality_report --out reports $(EVALUATE_ARGS)

# A real TorchServe with the demo model under 3000 mixed requests at concurrency 6: no unexpected
# 5xx, worker memory growth under 10 % after warm-up (a 300-request version runs in make test).
soak: model-store
	bash deploy/install-system-deps.sh java
	OMP_WAIT_POLICY=PASSIVE $(PY) -m tools.soak --json reports/soak.json

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
