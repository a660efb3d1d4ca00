#!/bin/sh
# SPF-Portrait trained in another CLIP than the one that scores it (issue 21, item 4), on the v3 Portrait
# World. The world CLIP (spfbench/world/weights/clip.safetensors) scores CLIP-T and CLIP-I and, by
# default, is also the CLIP of SPF's gamma and L_enhanced: SPF is then scored in the space it was trained
# in. A second world CLIP, the same recipe with seed 1 (spfbench/world/weights/clip-seed1.safetensors, its
# card clip-seed1.json), trains SPF here (SpfConfig.clip_weights); every row is then scored under both
# CLIPs. Same data, test set and stage 1 as the reading study (OUT=runs/spf-readings: run
# results/world/spf-readings/run.sh default-raw-sfcm first, it builds them and the shipped-CLIP SPF row).
# CPU (2 threads): ~5 min for the SPF row, ~1 min per rescoring. Resumable. From the repository root:
#   sh results/world/spf-clip/run.sh
set -eu
OUT=${OUT:-runs/spf-readings}
HERE=results/world/spf-clip
READING=${READING:-default-raw-sfcm}
SEED1=spfbench/world/weights/clip-seed1.safetensors
S="env HF_HUB_OFFLINE=1 .venv/bin/spfbench"
PY=.venv/bin/python
art=$(cd $OUT/stage1/methods/naive/train/artifact && pwd)
$PY results/world/spf-readings/compose.py results/world/spf-readings/readings/$READING.json "$art" \
  | $PY -c "import json,sys; c=json.load(sys.stdin); c['all']['clip_weights']='$SEED1'; print(json.dumps(c, indent=1))" \
  > $OUT/clip-seed1.json
$S run --testset $OUT/testset --data $OUT/data --out $OUT/clip-seed1 --config $OUT/clip-seed1.json --method spf
mkdir -p $HERE/samples
# ROW=RUN/METHOD: the untrained model, naive (stage 1), SPF trained in the shipped CLIP, SPF in the seed-1 CLIP
for row in original=stage1/original naive=stage1/naive spf=$READING/spf spf-clip-seed1=clip-seed1/spf; do
  name=${row%%=*}; path=${row#*=}; images=$OUT/${path%/*}/methods/${path#*/}
  cp $images/score/samples.jsonl $HERE/samples/$name.shipped.jsonl
  $S score --preset world --testset $OUT/testset --images $images/images --out $OUT/clip-scores/$name \
    --weights clip-world=$SEED1 --metric clip-t@vit-l-14 --metric clip-i@vit-l-14 --no-progress > /dev/null
  cp $OUT/clip-scores/$name/samples.jsonl $HERE/samples/$name.seed1.jsonl
done
$PY $HERE/summarize.py $HERE
