# vidiff: `make demo` and `make test` do all setup on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Without a GPU the CPU build of torch is installed: here from the local wheel pip is configured with;
# elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_INDEX ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=
# The demo's tiny cascade: configs/cascade/{base,tsr,ssr}.yaml on the demo's shards and VAE, briefly, on the demo's
# 9-frame clips at 8 fps (the benchmark's cascade ends at 17 frames and 16 fps): tsr doubles the frame rate.
DEMO_CASCADE := data.shards=runs/demo/shards vae.checkpoint=runs/demo/vae train.steps=200 train.checkpoint_every=200 \
	model.hidden_size=96 model.depth=2 parallel.compile=false
DEMO_STAGE_base :=
DEMO_STAGE_tsr := 'data.buckets=[[9, 24, 24]]' cascade.frame_factor=2
DEMO_STAGE_ssr := 'data.buckets=[[9, 48, 48]]'

.PHONY: setup demo test test-fast test-browser clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
else
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The whole path on synthetic moving shapes in about 10 minutes on 2 CPU cores: shards, the VAE, latents, the DiT,
# then one mp4 per prompt with the ground-truth checker's verdict beside it (vidiff/eval/shapes.py); then a tiny
# cascade (base -> temporal -> spatial super-resolution) trained briefly and sampled, each stage's output kept.
demo: setup clean-demo
	$(BIN)/vidiff shards --synthetic 1000 --height 48 --width 48 --out runs/demo/shards --max-count 250
	launchers/local.sh configs/demo/vae.yaml
	$(BIN)/vidiff cache-latents configs/demo/dit.yaml data.shards=runs/demo/shards --out runs/demo/latents \
		--text --windows 1
	launchers/local.sh configs/demo/dit.yaml
	$(BIN)/vidiff sample configs/demo/dit.yaml --check
	$(foreach stage,base tsr ssr,launchers/local.sh configs/cascade/$(stage).yaml out_dir=runs/demo/cascade/$(stage) \
		$(DEMO_CASCADE) $(DEMO_STAGE_$(stage)) &&) true
	$(BIN)/vidiff sample --cascade configs/demo/cascade.yaml --check
	@echo
	@echo "samples:     runs/demo/dit/samples/ (one mp4 per prompt, contact_sheet.png)"
	@echo "cascade:     runs/demo/cascade/samples/ (final mp4s, each stage's mp4/GIF/frames, *_stages.gif)"
	@echo "tensorboard: $(BIN)/tensorboard --logdir runs/demo"

clean-demo:
	rm -rf runs/demo

test: setup
	$(BIN)/python -m pytest -q -rs --durations=10 $(PYTEST_ARGS)

# TensorBoard in headless Chromium (tests/browser, not part of `make test`): installs Debian's chromium and
# chromium-driver (as root) and selenium; screenshots go to docs/screenshots/.
test-browser: setup
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
	$(BIN)/pip install -q selenium
	VIDIFF_BROWSER_TESTS=1 $(BIN)/python -m pytest -q tests/browser $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)
