#!/bin/sh
# Table 1 on the world at another guidance scale (docs/world.md, "Guidance and the bar"): a test set whose
# originals are drawn at scale G, and every method of run.sh generating and scored at G. Training does not
# depend on the scale, so each trained method's train folder is linked from run.sh's run (runs/world-exp/run,
# which must be complete): `spfbench run` reuses a finished artifact whose config, data and model match,
# and the links resolve to the very artifact paths SPF's and Magnet's configs name. Resumable.
# Usage (repository root): sh results/world/run_guidance.sh G     e.g. G = 1.5
# METHODS="original naive" sh results/world/run_guidance.sh G: only those methods (RESULTS=DIR: copy the
# tables there instead of results/world/cfgG).
set -eu
G=${1:?give the guidance scale, e.g. 1.5}
OUT=${OUT:-runs/world-exp}
R=$OUT/run-cfg$G
S="env HF_HUB_OFFLINE=1 .venv/bin/spfbench"
M=${METHODS:-"original naive lora adalora tokencompose magnet spf spf-no-text spf-no-fine spf-no-enh spf-no-sfcm"}
DEST=${RESULTS:-results/world/cfg$G}
$S build-testset --preset world --captions $OUT/captions.jsonl --out $OUT/testset-cfg$G --guidance $G
for m in $M; do
  case $m in original|magnet) continue ;; esac  # nothing trained (Magnet on naive's model): made in place
  test -f $OUT/run/methods/$m/train/run.json || { echo "run.sh's $m is not trained: run results/world/run.sh first"; exit 2; }
  mkdir -p $R/methods/$m
  test -e $R/methods/$m/train || ln -s "$(pwd)/$OUT/run/methods/$m/train" $R/methods/$m/train
  test -e $R/methods/$m/config.json || cp $OUT/run/methods/$m/config.json $R/methods/$m/config.json
done
$S run --testset $OUT/testset-cfg$G --data $OUT/data --out $R --config results/world/config.json \
  $(for m in $M; do printf -- '--method %s ' $m; done) || true
$S world attributes $R > /dev/null
mkdir -p $DEST
for f in results.csv results.md results.tex results.json attributes.md attributes.json run.json; do
  cp $R/$f $DEST/$f
done
