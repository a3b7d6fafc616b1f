# llmkit developer commands. `make install` then `make test`; see README.md.
PY ?= python3
TORCH_CPU ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1
# the pipeline shows a quiet machine's speed: all cores (PIPELINE_THREADS=1 make pipeline on a busy one)
PIPELINE_THREADS ?= $(shell nproc 2>/dev/null || echo 1)
# test files run on this many pytest-xdist workers, each on one torch thread (TEST_WORKERS=0: one process, in order)
TEST_WORKERS ?= 2

.PHONY: install install-torch test lint bench demo pipeline clean

install: install-torch  ## torch (CPU build when there is no GPU), then llmkit with its dev extras (and deepspeed)
	$(PY) -m pip install -e ".[dev,tensorboard,deepspeed]"

install-torch:
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install "torch>=2.6"; \
	else \
		$(PY) -m pip install --timeout 30 --retries 0 --extra-index-url https://download.pytorch.org/whl/cpu "$(TORCH_CPU)"; \
	fi

test:  ## the whole suite (one thread per worker, offline), ~minutes on 2 CPU cores
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile

lint:
	$(PY) -m ruff check llmkit tests scripts

bench:  ## training throughput and MFU vs HF transformers, side by side
	$(PY) scripts/bench.py

demo:  ## tokenize -> pretrain -> generate -> evaluate on the embedded default
	bash scripts/demo.sh

pipeline:  ## every stage on the tiny world (tokenize -> ... -> evaluate) and one table of held-out metrics
	OMP_NUM_THREADS=$(PIPELINE_THREADS) bash scripts/pipeline.sh

clean:
	rm -rf runs .pytest_cache build dist *.egg-info
