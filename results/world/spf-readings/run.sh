#!/bin/sh
# The SPF-Portrait reading study (issue 21) on the v3 Portrait World: one shared stage 1 (the experiment's
# naive: results/world/config.json's budget, 1200 x 16 at 5e-4) and a gentle one (results/world/gentle.json,
# 5e-5), then for each reading in readings/*.json full SPF and its four ablations, stage 2 as in the
# experiment (200 steps, batch 16, lr 5e-4), each reading's run naming the shared stage-1 artifact
# (stage1_artifact) so naive is fitted once. Same data, captions and test set as results/world/run.sh
# (same commands and seeds: the same 150 triples). CPU (2 threads): ~4 min per SPF row. Resumable: rerun
# after a kill. Run from the repository root:  sh results/world/spf-readings/run.sh [READING ...]
# (READING: a readings/*.json name, or gentle-NAME for that reading on the gentle stage 1; none: PLAN).
# REPLICATE=rK writes beside the committed folders (stage1-rK, NAME-rK): the same commands on another
# machine, whose CPU rounds differently (run.json records the CPU), as a replicate.
set -eu
OUT=${OUT:-runs/spf-readings}
HERE=results/world/spf-readings
R=${REPLICATE:+-$REPLICATE}
S="env HF_HUB_OFFLINE=1 .venv/bin/spfbench"
PY=.venv/bin/python
$S world data --split finetune --n 4000 --out $OUT/data
$S masks --preset world --data $OUT/data --no-progress
$S world captions --n 150 --out $OUT/captions.jsonl
$S build-testset --preset world --captions $OUT/captions.jsonl --out $OUT/testset
RUN="$S run --testset $OUT/testset --data $OUT/data"
SPF="--method spf --method spf-no-text --method spf-no-fine --method spf-no-enh --method spf-no-sfcm"

# stage 1: the untrained reference row and naive (the experiment's budget; the gentle one)
$RUN --out $OUT/stage1 --config results/world/config.json --method original --method naive
keep() {  # keep RUN NAME: Table 1, per-triple scores and stage-2 diagnostics, committed beside this script
  mkdir -p $HERE/$2/samples
  for f in results.csv results.md results.json; do cp $1/$f $HERE/$2/$f; done
  for m in $1/methods/*/score/samples.jsonl; do cp $m $HERE/$2/samples/$(basename $(dirname $(dirname $m))).jsonl; done
  $PY $HERE/diagnostics.py $1 > $HERE/$2/diagnostics.json
}
keep $OUT/stage1 stage1$R

reading() {  # reading NAME STAGE1_RUN OUT_NAME
  art=$(cd $2/methods/naive/train/artifact && pwd)
  $PY $HERE/compose.py $HERE/readings/$1.json "$art" > $OUT/$3.json
  $RUN --out $OUT/$3 --config $OUT/$3.json $SPF || true
  keep $OUT/$3 $3$R
}
# in order of what the question needs first; gentle-NAME: reading NAME on the gentle stage 1
PLAN=${*:-"l2sq-sum l2sq-sum-raw-sfcm default gentle-l2sq-sum-raw-sfcm hidden-l2sq-sum l2-sum gentle-default default-raw-sfcm"}
case " $PLAN" in *" gentle-"*)  # the gentle stage 1, only when a reading needs it
  $RUN --out $OUT/stage1-gentle --config results/world/gentle.json --method naive
  keep $OUT/stage1-gentle stage1-gentle$R ;;
esac
for r in $PLAN; do
  case $r in
    gentle-*) reading ${r#gentle-} $OUT/stage1-gentle $r ;;
    *) reading $r $OUT/stage1 $r ;;
  esac
done
$PY $HERE/summarize.py $HERE
