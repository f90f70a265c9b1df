# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv at the repository root and install the package into it.
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-slow setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: this resolves to the local CPU wheel instead of a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# only its bundled CLIP BPE vocabulary is used (tests build a CLIP tokenizer from it);
	# --no-deps keeps torchvision and a second torch out
	$(BIN)/pip install -q --no-deps open_clip_torch==3.3.0
	touch $@

demo: setup
	$(BIN)/datasetdm demo --out demo-out

test: setup
	@# headless Chromium opens the HTML gallery in one test; best effort (skipped without it)
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the gallery browser test will be skipped"
	$(BIN)/python scripts/check_layers.py
	$(BIN)/python -m pytest -q

test-slow: setup
	@# Ray (the .[ray] extra) for generate --workers; the default run skips those tests without it
	$(BIN)/pip install -q -e '.[dev,ray]'
	$(BIN)/python -m pytest -q -m slow
