#!/bin/bash
# Cold install of requirements/lock.txt into two scratch venvs, side by side in one run: pip (the
# fallback) and uv (what `make install` uses). No caches (uv's is a fresh folder; pip keeps none here).
# Usage: bash benchmarks/bench_install.sh [OUT.json]   (from the repository root; network to the registry)
set -e
OUT=${1:-results/install_cpu.json}
UV_VERSION=$(sed -n 's/^UV_VERSION := //p' Makefile)
T=$(mktemp -d)
python3 -m venv "$T/pip" && python3 -m venv "$T/uv"
s=$(date +%s); "$T/pip/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -c requirements/lock.txt -e ".[test]"; pip_s=$(( $(date +%s) - s ))
s=$(date +%s); "$T/uv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" && \
  UV_CACHE_DIR="$T/uvcache" "$T/uv/bin/uv" pip install --quiet --python "$T/uv/bin/python" -c requirements/lock.txt -e ".[test]"; uv_s=$(( $(date +%s) - s ))
same=$(diff <("$T/pip/bin/pip" freeze --exclude-editable | sort) <("$T/uv/bin/pip" freeze --exclude-editable | grep -v '^uv' | sort) >/dev/null && echo true || echo false)
printf '{"command": "bash benchmarks/bench_install.sh", "date": "%s", "pip_seconds": %s, "uv_seconds": %s, "ratio_pip_over_uv": %s, "same_versions": %s}\n' \
  "$(date -u +%F)" "$pip_s" "$uv_s" "$(python3 -c "print(round($pip_s / max(1, $uv_s), 1))")" "$same" | tee "$OUT"
rm -rf "$T"
