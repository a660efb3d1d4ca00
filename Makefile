# Set-up and entry points. Each target creates .venv if needed and installs the exact versions of
# requirements/lock.txt (re-installs only when pyproject.toml or the lock file changed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: install test demo bench lock clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/lock.txt -e ".[test]"
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The embedded default, end to end on CPU with small random-weight models (`tiny`): a test set, the
# original model's answer to every complete caption (same seed, same id: the no-training reference row),
# and the eight Table 1 metrics of those images. Methods join when trainers land.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/spfbench build-testset --preset tiny --n 16 --out $(DEMO_OUT)/testset
	$(BIN)/python -c "import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; \
	  print(''.join(json.dumps(dict(id=r['id'], seed=r['seed'], base_caption=r['target_caption'], target_text=r['target_text'])) + '\n' for r in rows), end='')" \
	  $(DEMO_OUT)/testset/testset.jsonl > $(DEMO_OUT)/complete-captions.jsonl
	HF_HUB_OFFLINE=1 $(BIN)/spfbench build-testset --preset tiny --captions $(DEMO_OUT)/complete-captions.jsonl --out $(DEMO_OUT)/original-model
	HF_HUB_OFFLINE=1 $(BIN)/spfbench score --preset tiny --testset $(DEMO_OUT)/testset --images $(DEMO_OUT)/original-model/originals --out $(DEMO_OUT)/score
	@echo "demo output: $(DEMO_OUT)/testset, $(DEMO_OUT)/original-model/originals, $(DEMO_OUT)/score (samples.jsonl, summary.json)"

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_build_testset.py --preset tiny
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_metrics.py --preset tiny --out results/metrics_tiny_cpu.json

# Re-resolve pyproject.toml's ranges in a scratch venv and freeze them into requirements/lock.txt.
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv
	.lockvenv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
	{ echo "# Exact versions for spfbench's own machines (CPU dev/CI: registry CUDA build of torch, runs on CPU)."; \
	  echo "# Regenerate: make lock"; \
	  .lockvenv/bin/pip freeze --exclude-editable; } > requirements/lock.txt
	rm -rf .lockvenv

clean:
	rm -rf $(VENV) runs .pytest_cache
