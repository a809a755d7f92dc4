# Every target creates/uses .venv itself, so each one works from a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: serve test lint fuzz bench-vq train-default clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.dev-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[dev]' $(TORCH_PIN)
	touch $@

# the service needs no torch: `make serve` on a fresh clone installs the serve extras only
$(VENV)/.serve-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[serve]'
	touch $@

serve: $(VENV)/.serve-installed
	$(BIN)/vqtok-serve --host 127.0.0.1 --port 8000 --model-dir models/default

test: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# schemathesis, every phase, against a real vqtok-serve on models/default (>= 1000 cases)
fuzz: $(VENV)/.dev-installed
	$(BIN)/python -m benchmarks.fuzz --max-examples 100

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The pipeline that produced models/default (resumable: re-run it after an interruption):
# train on package-photos:train, choose the checkpoint on package-photos:val (vqtok-select),
# report it on the pip-bundled test photos at native size, export + verify ONNX parity into
# models/default; model.json and its card are generated from what these steps recorded.
DEFAULT_RUN := runs/default
train-default: $(VENV)/.dev-installed
	$(BIN)/vqtok-train --config training/configs/default.yaml --resume
	$(BIN)/vqtok-select $(DEFAULT_RUN) --data package-photos:val
	$(BIN)/vqtok-eval $(DEFAULT_RUN)/checkpoints/selected --data pip-photos --out $(DEFAULT_RUN)/eval
	$(BIN)/vqtok-export $(DEFAULT_RUN)/checkpoints/selected --out models/default \
		--card training/configs/default-card.json --metrics $(DEFAULT_RUN)/eval/report.json

$(VENV)/.bench-installed: $(VENV)/.dev-installed
	$(BIN)/pip install --quiet -e '.[bench]' $(TORCH_PIN)
	touch $@

bench-vq: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.vq_layer

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
