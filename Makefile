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

# The embedded default, end to end: for now a `tiny` test set (random-weight model, CPU, seconds).
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/spfbench build-testset --preset tiny --n 16 --out $(DEMO_OUT)/testset
	@echo "demo output: $(DEMO_OUT)/testset (testset.json, testset.jsonl, originals/)"

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_build_testset.py --preset tiny

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
