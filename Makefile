# One command per job; each creates/uses the virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= build/demo
BENCH_ARGS ?=
BENCH_RECIPES ?= tiny tiny-xl
TINY_WEIGHTS ?= recipes/weights/tiny-shapes.safetensors

.PHONY: install test test-slow demo bench bench-shapes train-tiny clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,serve]'
	# TensorRT's published API, checked against our adapter; its dependency is the uninstallable wheel.
	$(PY) -m pip install --quiet --no-deps tensorrt-stubs==10.13.0.35.1
	touch $(STAMP)

install: $(STAMP)

# Default tier: CPU only, tiny recipe, parity with independent implementations.
test: $(STAMP)
	$(PY) -m pytest -q --durations=25

# Full-size SD 1.5 / 2.1 architectures with random weights (tens of minutes, ~16 GB memory).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Tiny recipe: export with random weights, optimize, and generate a PNG.
demo: $(STAMP)
	$(VENV)/bin/sdcompile export --recipe tiny --random-weights --seed 0 --component all --out $(DEMO_DIR)/bundle --force
	$(VENV)/bin/sdrun txt2img --bundle $(DEMO_DIR)/bundle --prompt "a lighthouse on a cliff at dawn" --seed 42 --out $(DEMO_DIR)/demo.png

# Every tiny twin's pipeline benchmark, one results set per recipe.
bench: $(STAMP)
	for recipe in $(BENCH_RECIPES); do $(PY) -m benchmarks --recipe $$recipe $(BENCH_ARGS) || exit 1; done

# What the trained tiny-shapes (TINY_WEIGHTS) draws, judged from its pixels: fp32, fp16, guidance 1, img2img,
# every sampler; a labelled grid of a few prompts beside the results.
bench-shapes: $(STAMP)
	$(PY) -m benchmarks.shapes.bench --weights $(TINY_WEIGHTS)
	$(PY) -m benchmarks.shapes.grid --bundle build/shapes/fp32 --out build/shapes/grid.png

# Train tiny-shapes from seed 0 on generated shapes (the whole machine for up to 45 minutes); CI never runs it.
train-tiny: $(STAMP)
	$(PY) -m benchmarks.shapes.train --seed 0 --out $(TINY_WEIGHTS)

clean:
	rm -rf build .pytest_cache
