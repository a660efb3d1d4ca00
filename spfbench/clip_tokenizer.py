"""The CLIP BPE tokenizer of Stable Diffusion 1.x, built offline.

SD1.5 (and Realistic Vision) use OpenAI CLIP's tokenizer (49408 tokens, 77 positions). Its merges ship
inside the ``open_clip_torch`` wheel as ``bpe_simple_vocab_16e6.txt.gz``; the Hugging Face
``vocab.json`` is derived from them the way OpenAI's ``SimpleTokenizer`` does: the 256 byte symbols,
the same with ``</w>``, one token per merge (the first 48894), then ``<|startoftext|>`` and
``<|endoftext|>``. Building it from that file gives the real tokenizer with no download, for the
random-weight presets and for single-file checkpoints, which carry no tokenizer.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

N_MERGES = 49152 - 256 - 2
MAX_LENGTH = 77


def bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip_torch is not installed; it ships the CLIP BPE merges file")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` (SD1.5's settings) to folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


@functools.lru_cache(maxsize=1)
def _cached_dir() -> str:
    # Written once per process; the tokenizer object keeps everything in memory after loading.
    return str(write_tokenizer_files(tempfile.mkdtemp(prefix="spfbench-clip-tokenizer-")))


def clip_tokenizer():
    """A fresh ``transformers.CLIPTokenizer`` identical to SD1.5's ``tokenizer/`` folder."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_cached_dir())
