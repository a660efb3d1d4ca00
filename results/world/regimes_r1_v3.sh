#!/bin/sh
# The longer, gentler regime r1 (regime_r1.json: lr 1e-4, 3,000 x 16) on the v3 looks, beside regimes.sh's
# budget and gentle rows (same data and test set, CFG 3; run regimes.sh first). -> regimes_r1_v3.{md,json}
set -eu
OUT=${OUT:-runs/world-exp}
S="env HF_HUB_OFFLINE=1 .venv/bin/spfbench"
$S run --testset $OUT/testset --data $OUT/data --out $OUT/r1 --config results/world/regime_r1.json --method original --method naive \
  --metric gt-target@world-reader --metric gt-preserve@world-reader --metric clip-t@vit-l-14
$S world attributes $OUT/r1 > /dev/null
.venv/bin/python results/world/regimes.py --out results/world/regimes_r1_v3 r1=$OUT/r1
