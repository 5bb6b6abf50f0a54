# Shared by vae_run.sh and ldm_run.sh (sourced after each has taken its own leading arguments):
# the optional DATA argument, the `-- key=value ...` overrides as --set flags in `sets`, the
# run folder runs/quality/, one thread per process unless OMP_NUM_THREADS says otherwise, $PY.
# The data: python tools/make_demo_data.py --out data/png && python tools/pack_h5.py --src data/png
#   --out data/demo.h5, and the same with --seed 7 into data/png7 and data/demo7.h5.
data=data/demo.h5
if [[ ${1:-} != "--" && -n ${1:-} ]]; then data=$1; shift; fi
[[ ${1:-} == "--" ]] && shift
overrides="$*"
mkdir -p runs/quality
sets=(); for kv in "$@"; do sets+=(--set "$kv"); done
export PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
