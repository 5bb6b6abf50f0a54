#!/usr/bin/env bash
# Train one demo-preset VAE variant and report its in-brain figures (the demo-quality experiments).
#   bench/demo_quality/vae_run.sh NAME [DATA] -- key=value ...   -> runs/quality/NAME, runs/quality/NAME/inbrain.json, recon.png
# One thread per process (OMP_NUM_THREADS=1): on the shared, loaded machine two threads were
# measured 7.6x slower per step than one; quality at a fixed step count does not depend on it.
# The data: python tools/make_demo_data.py --out data/png && python tools/pack_h5.py --src data/png
#   --out data/demo.h5, and the same with --seed 7 into data/png7 and data/demo7.h5.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1; shift
data=data/demo.h5
if [[ ${1:-} != "--" && -n ${1:-} ]]; then data=$1; shift; fi
[[ ${1:-} == "--" ]] && shift
mkdir -p runs/quality
sets=(); for kv in "$@"; do sets+=(--set "$kv"); done
export PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
start=$(date +%s)
$PY -m oasis_ldm.train --stage vae --config demo --run-dir runs/quality/$name --set data.path=$data "${sets[@]}" > runs/quality/$name.log 2>&1
end=$(date +%s)
other=data/demo7.h5; [[ $data == data/demo7.h5 ]] && other=data/demo.h5
$PY bench/demo_quality/inbrain.py --vae-ckpt runs/quality/$name --data $data $other --png runs/quality/$name/recon.png > runs/quality/$name/inbrain.json
echo "{\"name\": \"$name\", \"train_wall_s\": $((end - start)), \"sets\": \"$*\"}" >> runs/quality/$name/inbrain.json
cat runs/quality/$name/inbrain.json
