#!/usr/bin/env bash
# Train one demo-preset VAE variant and report its in-brain figures (the demo-quality experiments).
#   bench/demo_quality/vae_run.sh NAME [DATA] -- key=value ...   -> runs/quality/NAME, runs/quality/NAME/inbrain.json, recon.png
# One thread per process (OMP_NUM_THREADS=1): on the shared, loaded machine two threads were
# measured 7.6x slower per step than one; quality at a fixed step count does not depend on it.
# DATA, the overrides and the data files: common.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1; shift
source bench/demo_quality/common.sh "$@"
start=$(date +%s)
$PY -m oasis_ldm.train --stage vae --config demo --run-dir runs/quality/$name --set data.path=$data "${sets[@]}" > runs/quality/$name.log 2>&1
end=$(date +%s)
other=data/demo7.h5; [[ $data == data/demo7.h5 ]] && other=data/demo.h5
$PY bench/demo_quality/inbrain.py --vae-ckpt runs/quality/$name --data $data $other --png runs/quality/$name/recon.png > runs/quality/$name/inbrain.json
echo "{\"name\": \"$name\", \"train_wall_s\": $((end - start)), \"sets\": \"$overrides\"}" >> runs/quality/$name/inbrain.json
cat runs/quality/$name/inbrain.json
