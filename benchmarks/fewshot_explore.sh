#!/usr/bin/env bash
# The exploration runs behind the README's few-shot notes (not the benchmark table):
#   sweep : MAML/FOMAML inner steps x lr on 5w1s (the choice of 5 x 0.1), Meta-LSTM
#           from scratch and from the fine-tune body; each trained up to TT seconds,
#           then scored on 600 test episodes with both BN modes.
#   5w5s  : Meta-LSTM variants on 5w5s (T = 15, --grad-scale none), 1,500 episodes,
#           started from FT5 (a 5w5s finetune run, e.g. the benchmark's).
# Usage: benchmarks/fewshot_explore.sh sweep|5w5s DATA_DIR OUT_DIR [DEVICE]
# The README's numbers come from one H100 (DEVICE=cuda, all jobs at once).
set -euo pipefail
what=$1 D=$2 R=$3 DEV=${4:-cuda}
L2O="${L2O:-l2o}" TT=${TT:-300} FT5=${FT5:-benchmarks/results/fewshot_runs/omniglot-5w5s/finetune}
export OMP_NUM_THREADS=1
mkdir -p "$R"
ev() { # run_dir, extra eval args...
  local n=$1; shift
  for bn in support-running batch; do
    $L2O fewshot eval --checkpoint "$R/$n" --data-dir "$D" --episodes 600 --bn-mode $bn \
      --device "$DEV" --no-progress --json "$R/$n/test-$bn.json" "$@" >> "$R/$n.log" 2>&1
  done
}
job() { # name, train args...
  local n=$1; shift
  ( timeout "$TT" $L2O fewshot train --data-dir "$D" --out "$R/$n" --device "$DEV" \
      --no-progress --val-episodes 100 "$@" > "$R/$n.log" 2>&1 || true; ev "$n" ) &
}
if [ "$what" = sweep ]; then
  ( $L2O fewshot train --method finetune --data-dir "$D" --out "$R/finetune" --device "$DEV" \
      --no-progress --val-episodes 100 --val-every 500 > "$R/finetune.log" 2>&1
    job warm --method meta-lstm --init-from "$R/finetune" --meta-steps 8000 --val-every 500
    ev finetune; wait ) &
  job lstm --method meta-lstm --meta-steps 8000 --val-every 500
  job maml1 --method maml --inner-steps 1 --inner-lr 0.4 --meta-steps 24000 --val-every 2000
  job maml5 --method maml --inner-steps 5 --inner-lr 0.1 --meta-steps 16000 --val-every 2000
  job fo1 --method fomaml --inner-steps 1 --inner-lr 0.4 --meta-steps 24000 --val-every 2000
  job fo1s --method fomaml --inner-steps 1 --inner-lr 0.1 --meta-steps 24000 --val-every 2000
  job fo5 --method fomaml --inner-steps 5 --inner-lr 0.1 --meta-steps 16000 --val-every 2000
elif [ "$what" = 5w5s ]; then
  TT=100000
  s5="--ways 5 --shots 5 --val-every 375 --meta-steps 1500 --val-episodes 50"
  job warm8 --method meta-lstm --init-from "$FT5" $s5
  job warm8none --method meta-lstm --init-from "$FT5" --grad-scale none $s5
  job warm15 --method meta-lstm --init-from "$FT5" --inner-steps 15 $s5
  job scratch8none --method meta-lstm --grad-scale none $s5
else
  echo "usage: $0 sweep|5w5s DATA_DIR OUT_DIR [DEVICE]" >&2; exit 2
fi
wait
tail -n 2 "$R"/*.log
