# Set-up and entry points. Each target creates .venv if needed and installs the exact versions of
# requirements/lock.txt (re-installs only when pyproject.toml or the lock file changed). The install
# runs through uv (pinned below; same versions as pip would install, ~0.5 min instead of pip's 4-7 min
# for the 6.6 GB of torch + CUDA wheels: benchmarks/bench_install.sh -> results/install_cpu.json); pip installs the same lock if uv cannot be installed or fails
# (uv reads no pip.conf: a machine that reaches packages only through a pip mirror takes the pip path).
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
BIN := $(VENV)/bin
# extras installed: the tests' and ONNX Runtime's CPU build; GPU=1 (a CUDA machine) takes onnxruntime-gpu instead
GPU ?=
EXTRAS := test,$(if $(GPU),gpu,cpu)
STAMP := $(VENV)/.installed-$(EXTRAS)
DEMO_OUT ?= runs/demo
DEMO_TINY_OUT ?= runs/demo-tiny

.PHONY: install test demo demo-tiny bench lock clean browser

install: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	{ $(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION) && \
	  $(BIN)/uv pip install --quiet --python $(BIN)/python -c requirements/lock.txt -e ".[$(EXTRAS)]"; } || \
	{ echo "uv install failed; installing with pip (slower)"; \
	  $(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/lock.txt -e ".[$(EXTRAS)]"; }
	@# the two ONNX Runtime builds share one module: keep only the one asked for
	$(if $(GPU),$(BIN)/python -m pip uninstall -y -q onnxruntime 2>/dev/null; $(BIN)/python -m pip install -q --force-reinstall --no-deps onnxruntime-gpu,$(BIN)/python -m pip uninstall -y -q onnxruntime-gpu 2>/dev/null || true)
	rm -f $(VENV)/.installed*
	touch $(STAMP)

test: install browser
	HF_HUB_OFFLINE=1 SPFBENCH_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q

# Debian's headless Chromium + chromedriver for the HTML report test (tests/test_report_html.py); apt only when missing.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

# The embedded default: Portrait World (docs/world.md) end to end on CPU with the shipped world models
# (spfbench/world/weights/): a polluted fine-tuning set, a test set of 50 triples whose originals the
# world's original model makes, then naive, LoRA, AdaLoRA and SPF-Portrait fitted, generated and scored
# beside the untrained `original` reference row
# (Table 1's eight metrics + the world's ground-truth GT-Target / GT-Preserve); ends with Table 1 and the
# path of the HTML report. Rerun: resumes / reuses.
SPF := HF_HUB_OFFLINE=1 $(BIN)/spfbench
demo: install
	$(SPF) world data --split finetune --n 2000 --out $(DEMO_OUT)/data
	$(SPF) world captions --n 50 --out $(DEMO_OUT)/captions.jsonl
	$(SPF) build-testset --preset world --captions $(DEMO_OUT)/captions.jsonl --out $(DEMO_OUT)/testset
	$(SPF) run --testset $(DEMO_OUT)/testset --data $(DEMO_OUT)/data --out $(DEMO_OUT)/run \
	  --method original --method naive --method lora --method adalora --method spf --config spfbench/configs/run/world-demo.json

# Every code path in a few minutes on small random-weight models (`tiny`, numbers meaningless): toy
# portraits, 16 triples, naive + LoRA + SPF, the eight Table 1 metrics, retention table.
demo-tiny: install
	$(SPF) make-toy-data --out $(DEMO_TINY_OUT)/data --n 32
	$(SPF) build-testset --preset tiny --n 16 --steps 10 --out $(DEMO_TINY_OUT)/testset
	$(SPF) run --testset $(DEMO_TINY_OUT)/testset --data $(DEMO_TINY_OUT)/data --out $(DEMO_TINY_OUT)/run \
	  --method naive --method lora --method spf --config spfbench/configs/run/tiny-demo.json --retention

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_build_testset.py --preset tiny
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_metrics.py --preset tiny --out results/metrics_tiny_cpu.json

# Re-resolve pyproject.toml's ranges in a scratch venv and freeze them into requirements/lock.txt.
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv
	.lockvenv/bin/pip install --quiet --disable-pip-version-check -e ".[test,cpu]"
	{ echo "# Exact versions for spfbench's own machines (CPU dev/CI: registry CUDA build of torch, runs on CPU)."; \
	  echo "# Regenerate: make lock"; \
	  .lockvenv/bin/pip freeze --exclude-editable; } > requirements/lock.txt
	rm -rf .lockvenv

clean:
	rm -rf $(VENV) runs .pytest_cache
