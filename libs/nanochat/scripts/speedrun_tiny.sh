#!/usr/bin/env bash
# The tiny speedrun: every stage of the `speedrun` pipeline in order, on a CPU, with the `tiny`
# preset; base_train runs under `torchrun --nproc_per_node 2` (gloo).
#
#   libs/nanochat/scripts/speedrun_tiny.sh [RUN_DIR]      (what `make speedrun-tiny` runs)
#   SOURCE=python-docs libs/nanochat/scripts/speedrun_tiny.sh RUN_DIR   (make_data's --source; default stdlib)
#   SOURCE=python-docs DOCS_PATH=/x/_sources libs/nanochat/scripts/speedrun_tiny.sh RUN_DIR   (its --docs-path)
#
# RUN_DIR (default runs/speedrun-tiny) gets data/ (kept between runs: make_data reuses it),
# the artifacts (tokenizer, base, mid, sft, rl), eval results (eval_*), each stage's event log
# (events/NN_stage.jsonl, stdout of the stage), the human log (log.txt) and report/report.md;
# check_speedrun.py then prints each target of the tiny run, measured.
set -euo pipefail

RUN=${1:-runs/speedrun-tiny}
PY=${PYTHON:-python}
DATA=$RUN/data
EVENTS=$RUN/events
rm -rf "$RUN"/{tokenizer,base,mid,sft,rl,eval_*,report,events,*.resume} "$RUN"/log.txt
mkdir -p "$EVENTS"
n=0

# stage NAME [ARGS...]: run one stage with the tiny preset, events to events/NN_NAME.jsonl.
stage() {
  local name=$1; shift
  n=$((n + 1))
  local log; log=$(printf '%s/%02d_%s.jsonl' "$EVENTS" "$n" "$name")
  echo "== $name $*" | tee -a "$RUN/log.txt" >&2
  local start=$SECONDS
  "$@" --preset tiny --data-dir "$DATA" >"$log" 2>>"$RUN/log.txt" || {
    echo "stage $name failed; see $RUN/log.txt and $log" >&2; tail -5 "$RUN/log.txt" >&2; exit 1; }
  echo "   $name took $((SECONDS - start))s" | tee -a "$RUN/log.txt" >&2
}

stage make_data      $PY -m nanochat.stages.make_data  --source "${SOURCE:-stdlib}" ${DOCS_PATH:+--docs-path "$DOCS_PATH"}
stage tok_train      $PY -m nanochat.stages.tok_train  --out "$RUN/tokenizer"
stage tok_eval       $PY -m nanochat.stages.tok_eval   --init-from "$RUN/tokenizer"
stage base_train     torchrun --standalone --nproc_per_node 2 -m nanochat.stages.base_train \
                                                       --init-from "$RUN/tokenizer" --out "$RUN/base"
stage base_loss      $PY -m nanochat.stages.base_loss  --init-from "$RUN/base" --out "$RUN/eval_base_loss"
stage base_eval      $PY -m nanochat.stages.base_eval  --init-from "$RUN/base" --out "$RUN/eval_base_core"
stage mid_train      $PY -m nanochat.stages.mid_train  --init-from "$RUN/base" --out "$RUN/mid"
stage chat_eval      $PY -m nanochat.stages.chat_eval  --init-from "$RUN/mid" --out "$RUN/eval_mid"
stage chat_sft       $PY -m nanochat.stages.chat_sft   --init-from "$RUN/mid" --out "$RUN/sft"
stage chat_eval      $PY -m nanochat.stages.chat_eval  --init-from "$RUN/sft" --out "$RUN/eval_sft"
stage chat_rl        $PY -m nanochat.stages.chat_rl    --init-from "$RUN/sft" --out "$RUN/rl"
stage chat_eval      $PY -m nanochat.stages.chat_eval  --init-from "$RUN/rl" --out "$RUN/eval_rl"
stage report         $PY -m nanochat.stages.report     --out "$RUN/report" --init-from \
  "$RUN"/tokenizer "$RUN"/base "$RUN"/mid "$RUN"/sft "$RUN"/rl "$RUN"/eval_* "$EVENTS"/*.jsonl
echo "report card: $RUN/report/report.md" >&2
# What the tiny run must show (bpb falls to <= 0.65x, SFT learns its name, < 15 minutes); exit 1 if not.
$PY "$(dirname "$0")/check_speedrun.py" "$RUN"
