# medtune: every target creates/reuses .venv at the repository root and installs what it needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medtune-installed
RECIPE ?= recipes/aria.yaml
RUN ?= runs/aria

.PHONY: install test test-fast lint format demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is installed first and pinned to the CPU build (an unpinned torch would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,gguf,ui,docs]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/hadolint docker/Dockerfile.cpu docker/Dockerfile.gpu

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

# The docs build strictly and Debian's chromium is installed for the browser test.
test: $(STAMP) lint browser doc
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/medtune run $(RECIPE)

clean:
	rm -rf runs site build .pytest_cache .ruff_cache

# --- docs, containers, GPU check, browser for the UI test ------------------------------------------
# Containers are not exercised by the tests (no Docker engine on the CI machine); GPU=1 switches to
# docker/Dockerfile.gpu (vLLM) and `--gpus all`. The run folder $(RUN) is mounted read-only at /models/run;
# like `make serve` / `make serve-ft`, docker-serve serves its base model and docker-serve-ft its DPO model.
DOCKER_IMAGE ?= medtune
DOCKER_NAME ?= medtune-serve
DOCKER_PORT ?= 8001
GPU ?=
DOCKER_TAG := $(DOCKER_IMAGE):$(if $(GPU),gpu,cpu)
# .env settings go in; host, port and model are container-side values and always set here.
DOCKER_RUN = docker run -d --name $(DOCKER_NAME) -p $(DOCKER_PORT):8001 -v "$(abspath $(RUN)):/models/run:ro" \
	$(if $(wildcard .env),--env-file .env,) -e MEDTUNE_HOST=0.0.0.0 -e MEDTUNE_PORT=8001 \
	$(if $(GPU),--gpus all,) $(DOCKER_TAG)
CHROMIUM ?= /usr/bin/chromium

.PHONY: doc doc-serve docker-build docker-lint docker-serve docker-serve-ft docker-stop docker-logs check-gpu browser test-browser

doc: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

doc-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8080

docker-lint: $(STAMP)
	$(BIN)/hadolint docker/Dockerfile.cpu docker/Dockerfile.gpu

docker-build:
	docker build -f docker/Dockerfile.$(if $(GPU),gpu,cpu) -t $(DOCKER_TAG) .

docker-serve: docker-build
	$(DOCKER_RUN) --model /models/run/base
	@echo "serving $(RUN)/base on http://127.0.0.1:$(DOCKER_PORT)/v1 (make docker-logs, make docker-stop)"

docker-serve-ft: docker-build
	$(DOCKER_RUN) --model /models/run/dpo
	@echo "serving $(RUN)/dpo on http://127.0.0.1:$(DOCKER_PORT)/v1 (make docker-logs, make docker-stop)"

docker-stop:
	docker rm -f $(DOCKER_NAME)

docker-logs:
	docker logs -f $(DOCKER_NAME)

# Fails (exit 1) when no CUDA GPU is usable: QLoRA training and the vLLM engine need one.
check-gpu: $(STAMP)
	@command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv \
		|| echo "check-gpu: nvidia-smi not found (no NVIDIA driver on this machine)"
	@$(BIN)/python -c "import sys, torch; ok = torch.cuda.is_available(); \
		print(f'torch {torch.__version__}: CUDA', 'available, ' + ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if ok else 'not available: CPU only (the embedded model, GGUF and LoRA run; QLoRA and vLLM need a GPU)'); \
		sys.exit(0 if ok else 1)"

# Debian's chromium for the browser test (never a browser download of Playwright's own).
browser:
	@test -x $(CHROMIUM) || (apt-get update -qq && apt-get install -y -qq chromium)

test-browser: $(STAMP) browser
	$(BIN)/pytest -q tests/ui/test_web.py

# --- export and Hub (medtune export ...) ----------------------------------------------------------
# Repositories come from the recipe (export.hub.*) or .env (MEDTUNE_HF_MODEL_REPO, MEDTUNE_HF_DATASET_REPO),
# the token from HF_TOKEN; repositories are created private. DRY=1 lists the files without uploading.
.PHONY: gguf ollama hf-push-model hf-push-datasets

gguf: $(STAMP)
	$(BIN)/medtune export gguf $(RUN)

ollama: $(STAMP)
	$(BIN)/medtune export ollama $(RUN) --out $(RUN)/ollama

# The run's final model, its GGUF files (runs/<name>/gguf) and the model card.
hf-push-model: $(STAMP)
	$(BIN)/medtune export push $(RUN) $(if $(DRY),--dry-run,)

# The run's datasets (sft, dpo, test) and the dataset card.
hf-push-datasets: $(STAMP)
	$(BIN)/medtune export push $(RUN) --datasets $(if $(DRY),--dry-run,)

# --- evaluation and benchmarks (medtune eval / bench) ---------------------------------------------
# ARIA exact match + JSON validity on the run's 300 held-out cases, then a latency sweep (concurrency
# 1,2,4,8,16; 64 requests each), against the server at MEDTUNE_HOST:MEDTUNE_PORT. A server already
# running there (`make serve-ft` in another terminal) is measured as is; otherwise the benchmark
# starts `medtune serve --model $(RUN)/dpo --served-name aria-ft` on that port and stops it at the
# end. Report: $(RUN)/benchmark/report.{md,html}, results.json. BENCH_WRITE=1 also updates BENCHMARKS.md.
.PHONY: benchmark

benchmark: $(STAMP)
	$(BIN)/python bench/eval_bench.py --run $(RUN) $(if $(BENCH_WRITE),--write,)

# --- training (medtune train / run) ---------------------------------------------------------------
# The seed's two phases on $(RECIPE): SFT, then DPO on the SFT model (merged into $(RUN)/sft and $(RUN)/dpo),
# or the whole pipeline with the base-vs-SFT-vs-DPO evaluation (train-all, the same as `make demo`).
# Steps already done with the same inputs are skipped; RESUME=1 continues an interrupted stage from its
# newest checkpoint. Never train and serve on one GPU at once. Several GPUs: see recipes/accelerate/.
.PHONY: train-sft train-dpo train-all bench-train

train-sft: $(STAMP)
	$(BIN)/medtune train $(RECIPE) --stage sft $(if $(RESUME),--resume,)

train-dpo: $(STAMP)
	$(BIN)/medtune train $(RECIPE) --stage dpo $(if $(RESUME),--resume,)

train-all: $(STAMP)
	$(BIN)/medtune run $(RECIPE) $(if $(RESUME),--resume,)

# `make demo` (aria) and the headache recipe timed from scratch; BENCH_WRITE=1 updates BENCHMARKS.md.
bench-train: $(STAMP)
	$(BIN)/python bench/train_demo.py $(if $(BENCH_WRITE),--write,)

# --- serving (medtune serve / health) -------------------------------------------------------------
# The run's base model, SFT model or fine-tuned (DPO) model behind the OpenAI API; port, API key,
# served name, max model len come from .env (MEDTUNE_*) or SERVE_ARGS="--port 8002 --adapter derm=...".
# ENGINE=vllm hands over to vLLM's own server (GPU); ENGINE=llamacpp serves a GGUF file.
# Never train and serve on one GPU at once. `make health` checks the server from another terminal.
SERVE_ARGS ?=
ENGINE ?=
SERVE = $(BIN)/medtune serve $(if $(ENGINE),--engine $(ENGINE),) $(SERVE_ARGS)
.PHONY: serve serve-sft serve-ft health bench-serve

serve: $(STAMP)
	$(SERVE) --model $(RUN)/base

serve-sft: $(STAMP)
	$(SERVE) --model $(RUN)/sft

serve-ft: $(STAMP)
	$(SERVE) --model $(RUN)/dpo

health: $(STAMP)
	$(BIN)/medtune health

# Diagnosis latency (P50/P99), 8-client throughput, constrained-decoding overhead; BENCH_WRITE=1
# updates the serving section of BENCHMARKS.md.
bench-serve: $(STAMP)
	$(BIN)/python bench/serve_bench.py --run $(RUN) $(if $(BENCH_WRITE),--write,)
