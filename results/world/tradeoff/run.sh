#!/bin/sh
# Trade-off curves on the v3 Portrait World (issue 21): GT-Preserve against GT-Target for naive (its
# training steps: --curve 200 over the experiment's 1,200), LoRA (rank), AdaLoRA (target rank) and SPF
# (the alignment weights lambda2, lambda3 scaled together, on the reading given by SPF_READING, stage 1 =
# this naive run, or STAGE1=an artifact folder). Same data, captions, test set and budget as
# results/world/run.sh. Each point is an ordinary run folder (resumable: rerun after a kill). Run from
# the repository root:
#   sh results/world/tradeoff/run.sh [PART ...]      PART: naive lora adalora spf (default: all)
# LORA_RANKS="2 4 16 32" adds ranks to the LoRA line (default 2, 32; rank 8 is always run: the experiment's)
# POINTS=FILE adds the points of an earlier tradeoff.json (e.g. this folder's, for the lines not rerun);
# OUT=runs/spf-readings shares the reading study's data and test set (the same commands and seeds).
set -eu
PARTS=${*:-"naive lora adalora spf"}
has() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
OUT=${OUT:-runs/tradeoff}
HERE=results/world/tradeoff
SPF_READING=${SPF_READING:-results/world/spf-readings/readings/default-raw-sfcm.json}
S="env HF_HUB_OFFLINE=1 .venv/bin/spfbench"
PY=.venv/bin/python
$S world data --split finetune --n 4000 --out $OUT/data
$S world captions --n 150 --out $OUT/captions.jsonl
$S build-testset --preset world --captions $OUT/captions.jsonl --out $OUT/testset
RUN="$S run --testset $OUT/testset --data $OUT/data"
cfg() {  # cfg NAME JSON: a run config on the experiment's budget with METHOD-specific fields
  $PY - "$1" "$2" <<'PYEOF'
import json, sys
base = json.load(open("results/world/config.json"))
extra = json.loads(sys.argv[2])
for k, v in extra.items():
    base[k] = {**base.get(k, {}), **v}
json.dump(base, open(sys.argv[1], "w"), indent=1)
PYEOF
}
mkdir -p $OUT/configs
# naive: the training curve (step 0 = the untrained model) and the original row
if has naive; then
$RUN --out $OUT/naive --config results/world/config.json --method original --method naive --curve 200 --curve-limit 150
fi
if has lora; then
for r in ${LORA_RANKS:-2 32}; do
  cfg $OUT/configs/lora-r$r.json "{\"lora\": {\"rank\": $r}}"
  $RUN --out $OUT/lora-r$r --config $OUT/configs/lora-r$r.json --method lora
done
cfg $OUT/configs/lora-r8.json "{}"
$RUN --out $OUT/lora-r8 --config $OUT/configs/lora-r8.json --method lora
fi
if has adalora; then
for r in 2 4 8; do
  cfg $OUT/configs/adalora-r$r.json "{\"adalora\": {\"target_r\": $r, \"init_r\": $((r * 3 / 2))}}"
  $RUN --out $OUT/adalora-r$r --config $OUT/configs/adalora-r$r.json --method adalora
done
fi
if has spf; then
art=$(cd ${STAGE1:-$OUT/naive/methods/naive/train/artifact} && pwd)
for s in 0 1 10 100; do
  reading=$(cat $SPF_READING)
  cfg $OUT/configs/spf-x$s.json "{\"spf\": $(PYTHONIOENCODING=utf-8 $PY -c "import json,sys; r=json.loads(sys.argv[1]); r.update(lambda2=0.2*$s, lambda3=0.1*$s, stage1_artifact=sys.argv[2]); print(json.dumps(r))" "$reading" "$art")}"
  $RUN --out $OUT/spf-x$s --config $OUT/configs/spf-x$s.json --method spf
done
fi
runs=$(for d in $OUT/naive $OUT/lora-r* $OUT/adalora-r* $OUT/spf-x*; do [ -f $d/run.json ] && echo $d; done)
$S tradeoff ${POINTS:-} $runs --knob lora=rank --knob adalora=target_r \
  --knob spf=lambda2 --out $HERE --title "Portrait World v3: GT-Preserve against GT-Target (150 triples)"
cp $OUT/configs/*.json $HERE/ 2>/dev/null || true
