import os
import sys
import tempfile

# Before anything imports huggingface_hub: an empty, private cache and no network, ever.
_HF_HOME = tempfile.mkdtemp(prefix="spfbench-test-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(var, None)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Fast but real sampling settings for tests (the defaults differ only in step count).
FAST = ["--steps", "4", "--no-progress"]


@pytest.fixture(scope="session")
def hf_cache() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


@pytest.fixture(scope="session")
def tiny_pipe():
    from spfbench.models import load_pipeline

    pipe, _ = load_pipeline("tiny")
    return pipe


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the ``spfbench`` CLI in-process; returns (exit code, stdout, stderr)."""
    from spfbench.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["spfbench", *map(str, args)])
        capsys.readouterr()
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def snapshot(folder) -> dict:
    """Every file under folder (relative path -> bytes)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small-model tests (restored after): tiny models gain nothing from
    intra-op threads, and on a shared 2-core machine spinning OpenMP threads made forwards 10-50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
