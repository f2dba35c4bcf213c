#!/usr/bin/env bash
# The README table "Which explainer is most faithful?" (conf/comparison/lite0_imagenette.yaml) made on a CPU in
# pieces that survive interruptions: each step writes its result into this folder only once it is complete,
# and a rerun skips what is there, so the table can be made over several sessions or machines.
#
#   bash results/lite0_imagenette/run.sh [STEP ...]     # steps, in this order by default:
#     best, tame, sacam  train that head (experiments lite0_imagenette_best, tame_lite0_imagenette,
#              sacam_lite0_imagenette; the export kept in exports/<head>/, not in git), then score it on
#              imagenette/val in 16 shards -> <head>/shard<k>/; a head is retrained only while its shards are
#              unfinished, and tame-merge refuses shards of two different trainings (the weights' SHA-256)
#     free     the one-pass non-trainable explainers, 16 shards        -> free/shard<k>/
#     slow     Ablation-CAM, Score-CAM, RISE, SISE on the first 10 images of each class, 16 shards -> slow/shard<k>/
#     grid     every explainer on one image of each class (the heatmap grid, kept as a 2000-px JPEG) -> grid/;
#              it needs the exports of the scored heads (checked by their SHA-256), so run it while they are here
#     merge    tame-merge of all shards (against Grad-CAM, then against the best head) -> merged/, and the
#              README's tables from them (tables.py) -> merged/tables.md
#
# Scratch (training runs, full evaluation folders) goes to $TAME_LIT_SCRATCH (default /tmp/tame-lit-lite0);
# creating the file $TAME_LIT_SCRATCH/STOP stops the script between two pieces.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
scratch=${TAME_LIT_SCRATCH:-/tmp/tame-lit-lite0}
shards=16
free_explainers="cam,gradcam,gradcampp,xgradcam,layercam,ge,attention_gradcam,sacam_posthoc,smoothed,random"
slow_explainers="ablationcam,scorecam,rise,sise"
# the files tame-merge reads, and those worth keeping of a merged run or of the grid
run_files="metrics.json curves.json run.json per_image.csv .hydra/overrides.yaml"
report_files="metrics.json metrics.csv report.md run.json deletion.png insertion.png road.png"

cd "$repo"
mkdir -p "$scratch"

stop_requested() {
  if [[ -e "$scratch/STOP" ]]; then
    echo "$(date -u +%FT%TZ) stopping: $scratch/STOP exists"
    exit 0
  fi
}

# keep FILES of SOURCE in TARGET, all at once (a folder renamed into place), so TARGET is complete or absent
keep() {
  local source=$1 target=$2 files=$3 partial="$2.partial"
  rm -rf "$partial"
  mkdir -p "$partial"
  for file in $files; do
    [[ -e "$source/$file" ]] && cp "$source/$file" "$partial/$(basename "$file")"
  done
  mv "$partial" "$target"
}

timed() {
  local start
  start=$(date +%s)
  "$@"
  echo "$(date -u +%FT%TZ) done in $(($(date +%s) - start)) s: $*" | tee -a "$here/timings.log"
}

train() {
  local head=$1 experiment=$2
  [[ -e "$here/exports/$head/explainer.json" ]] && return
  stop_requested
  rm -rf "$scratch/train_$head"
  timed python train.py experiment="$experiment" logger=csv hydra.run.dir="$scratch/train_$head"
  mkdir -p "$here/exports"
  keep "$scratch/train_$head/export" "$here/exports/$head" "explainer.json head.safetensors"
}

shard() {
  local part=$1 k=$2
  shift 2
  [[ -e "$here/$part/shard$k/per_image.csv" ]] && return
  stop_requested
  rm -rf "$scratch/$part/shard$k"
  timed python evaluate.py comparison=lite0_imagenette data.num_shards=$shards data.shard="$k" logger=csv \
    hydra.run.dir="$scratch/$part/shard$k" "$@"
  mkdir -p "$here/$part"
  keep "$scratch/$part/shard$k" "$here/$part/shard$k" "$run_files"
}

# PART scored on every shard (the rest of the arguments: its evaluate.py options)
every_shard() {
  local part=$1 k
  shift
  for k in $(seq 0 $((shards - 1))); do shard "$part" "$k" "$@"; done
}

# shards an earlier training of this head scored must be of the same weights (training is not always
# bit-reproducible): stop at once rather than after hours, when tame-merge would refuse them
check_same_head() {
  local head=$1 scored
  [[ -d "$here/$head" ]] || return 0
  scored=$(find "$here/$head" -name run.json | head -1)
  [[ -z "$scored" ]] && return 0
  python - "$scored" "$here/exports/$head/explainer.json" "$head" <<'PYTHON'
import json
import sys

scored_run, export, head = sys.argv[1:]
scored = json.load(open(scored_run))["explainers"][head].get("weights_sha256")
trained = json.load(open(export))["sha256"]
if scored != trained:
    sys.exit(f"{export}: this training of {head!r} has weights {trained[:16]}..., but {scored_run} scored "
             f"{str(scored)[:16]}...: remove the shards of {head!r} to score this head, or restore their export")
PYTHON
}

# a head: trained unless its export is here or its shards are done, then scored shard by shard
step_head() {
  local head=$1 experiment=$2
  if [[ ! -e "$here/$head/shard$((shards - 1))/per_image.csv" ]]; then
    train "$head" "$experiment"
    check_same_head "$head"
  fi
  every_shard "$head" "explainers=[$head]" "heads.$head.checkpoint=$here/exports/$head"
}

step_free() {
  every_shard free "explainers=[$free_explainers]"
}

step_slow() {
  every_shard slow "explainers=[$slow_explainers]"
}

step_grid() {
  local head checkpoints=()
  [[ -e "$here/grid/heatmaps.jpg" ]] && return
  stop_requested
  # the grid must show the heads the table scored, not a later retraining
  for head in best tame sacam; do
    check_same_head "$head"
    checkpoints+=("heads.$head.checkpoint=$here/exports/$head")
  done
  rm -rf "$scratch/grid"
  timed python evaluate.py comparison=lite0_imagenette data.limit_per_class=1 grid_images=10 logger=csv \
    "explainers=[best,tame,sacam,$free_explainers,$slow_explainers]" "${checkpoints[@]}" hydra.run.dir="$scratch/grid"
  # the full-size grid (a 10 MB PNG) stays in the scratch folder; the repository keeps a 0.5 MB JPEG of it
  python - "$scratch/grid/heatmaps.png" "$scratch/grid/heatmaps.jpg" <<'PYTHON'
import sys

from PIL import Image

grid = Image.open(sys.argv[1]).convert("RGB")
width = 2000
grid.resize((width, round(grid.height * width / grid.width)), Image.LANCZOS).save(sys.argv[2], quality=80, optimize=True)
PYTHON
  keep "$scratch/grid" "$here/grid" "$report_files heatmaps.jpg"
}

step_merge() {
  local runs=("$here"/{best,tame,sacam,free,slow}/shard*)
  stop_requested
  rm -rf "$scratch/merged" "$scratch/merged_vs_best" "$scratch/merged_keep" "$here/merged"
  # the heads' shards scored no reference (compare_to is null there), so name it
  timed tame-merge "${runs[@]}" --compare-to gradcam --out "$scratch/merged"
  timed tame-merge "${runs[@]}" --compare-to best --out "$scratch/merged_vs_best"
  keep "$scratch/merged" "$scratch/merged_keep" "$report_files"
  keep "$scratch/merged_vs_best" "$scratch/merged_keep/vs_best" "metrics.json report.md"
  python "$here/tables.py" "$scratch/merged_keep" > "$scratch/merged_keep/tables.md"
  mv "$scratch/merged_keep" "$here/merged"
}

steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(best tame sacam free slow grid merge)
for step in "${steps[@]}"; do
  case $step in
    best) step_head best lite0_imagenette_best ;;
    tame) step_head tame tame_lite0_imagenette ;;
    sacam) step_head sacam sacam_lite0_imagenette ;;
    free | slow | grid | merge) "step_$step" ;;
    *) echo "unknown step '$step': use best, tame, sacam, free, slow, grid or merge" >&2; exit 2 ;;
  esac
done
echo "$(date -u +%FT%TZ) finished: ${steps[*]}"
