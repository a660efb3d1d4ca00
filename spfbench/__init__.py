"""spfbench: evaluation and benchmarking suite for text-driven portrait customization.

Reproduces the protocol of SPF-Portrait (base text / target text triples, original portraits from the
base model, customized images from fine-tuned methods, Table 1 metrics). See README.md and docs/.
"""

__version__ = "0.1.0"
