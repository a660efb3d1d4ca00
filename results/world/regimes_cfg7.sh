#!/bin/sh
# Fine-tuning regimes on the v3 world (issue 20, deliverable 3): naive fine-tuning at the experiment's budget, CFG 7 (the protocol scale then; since the world preset's default is 3, it is given)
# (results/world/config.json: 1,200 steps x 16, lr 5e-4; the experiment's own naive row, same run folder as
# run.sh) and a gentle stage 1 (gentle.json: the same steps at lr 5e-5), each beside the untrained `original`
# row, then results/world/regimes.py (GT-Target / GT-Preserve with CIs, per target text, relative weight
# change per module group). Resumable: rerun after a kill. Run from the repository root.
set -eu
OUT=${OUT:-runs/world-exp}
S="env HF_HUB_OFFLINE=1 .venv/bin/spfbench"
$S world data --split finetune --n 4000 --out $OUT/data
$S world captions --n 150 --out $OUT/captions.jsonl
$S build-testset --preset world --captions $OUT/captions.jsonl --out $OUT/testset --guidance 7
$S run --testset $OUT/testset --data $OUT/data --out $OUT/run --config results/world/config.json --method original --method naive
$S world attributes $OUT/run > /dev/null
$S run --testset $OUT/testset --data $OUT/data --out $OUT/gentle --config results/world/gentle.json --method original --method naive
$S world attributes $OUT/gentle > /dev/null
.venv/bin/python results/world/regimes.py --out results/world/regimes_cfg7 budget=$OUT/run gentle=$OUT/gentle
