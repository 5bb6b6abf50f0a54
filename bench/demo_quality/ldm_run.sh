#!/usr/bin/env bash
# Train one demo-preset LDM variant on a trained VAE run, sample 64 slices and score them
# (the demo-quality experiments).
#   bench/demo_quality/ldm_run.sh NAME VAE_RUN [DATA] -- key=value ...  -> runs/quality/NAME, runs/quality/NAME/samples/grid.png, stats.json
# DATA, the overrides and the data files: common.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1; vae=$2; shift 2
source bench/demo_quality/common.sh "$@"
t0=$(date +%s)
$PY -m oasis_ldm.train --stage ldm --config demo --run-dir runs/quality/$name --set data.path=$data --set ldm.vae_ckpt=runs/quality/$vae "${sets[@]}" > runs/quality/$name.log 2>&1
t1=$(date +%s)
$PY -m oasis_ldm.sampling --ckpt runs/quality/$name --num-samples 64 --out runs/quality/$name/samples --batch-size 64 >> runs/quality/$name.log 2>&1
t2=$(date +%s)
$PY bench/demo_quality/sample_stats.py --samples runs/quality/$name/samples/samples.h5 --data $data > runs/quality/$name/stats.json
echo "{\"name\": \"$name\", \"vae\": \"$vae\", \"train_wall_s\": $((t1 - t0)), \"sample_wall_s\": $((t2 - t1)), \"sets\": \"$overrides\"}" >> runs/quality/$name/stats.json
cat runs/quality/$name/stats.json
