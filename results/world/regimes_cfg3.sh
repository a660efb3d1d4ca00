#!/bin/sh
# Fine-tuning regimes on the v3 world at guidance 3 (issue 20; docs/world.md, "Fine-tuning regimes on the v3
# world"): the experiment's naive (budget) and the untrained `original` on a CFG 3 test set (run_guidance.sh,
# reusing regimes_cfg7.sh's trained naive), then naive at lr 1e-4 x 3,000 (regime_r1.json) and 2e-4 x 2,000
# (regime_r2.json), GT metrics and CLIP-T only; then regimes.py -> regimes_cfg3.{md,json}. After regimes_cfg7.sh;
# resumable. (The committed figures came from the same commands with the r1/r2 run folders under runs/probe/.)
set -eu
OUT=${OUT:-runs/world-exp}
S="env HF_HUB_OFFLINE=1 .venv/bin/spfbench"
METHODS="original naive" RESULTS=$OUT/run-cfg3 sh results/world/run_guidance.sh 3
for r in r1 r2; do
  $S run --testset $OUT/testset-cfg3 --data $OUT/data --out $OUT/$r --config results/world/regime_$r.json --method original --method naive \
    --metric gt-target@world-reader --metric gt-preserve@world-reader --metric clip-t@vit-l-14
  $S world attributes $OUT/$r > /dev/null
done
.venv/bin/python results/world/regimes.py --out results/world/regimes_cfg3 budget=$OUT/run-cfg3 r1=$OUT/r1 r2=$OUT/r2
