#!/usr/bin/env bash
# The GPU cross-validation run of docs/ablation.md ("Width on a GPU"), as it ran on the lent
# machine: the shipped recipe (cv-bbox-hue) at widths 1.0, 0.25 and 0.5 and with mixup, each
# over the 4 folds of export.cv, trained by export.train_jax (Keras 3 on JAX).
#
# Prepared here:  python -m export.gpu pack --data ../shared/data/cnmc --out .gpu/pack.npz \
#                     --crop bbox --margin 0.08 --scale-range 0.8,1.1 --quality 95
#                 and the wheels JAX's image lacks (keras 3.15.1, namex, optree) in .whl/
# The 2026-11-27 run used that lossy pack (18 MB; the lossless one, 58 MB, did not fit the
# 64 MiB the device tool carries beside the repository). Trained on it, the models' outputs
# moved on the real crops (docs/ablation.md): next time pack lossless (the default) in two
# parts (--parts 2) and send them in two calls on the same warm machine.
# Run there:      bash export/gpu_cv.sh OUT_DIR
# Back here:      python -m export.gpu import --from OUT_DIR --name w0.25 --out runs/cv-gpu-w0.25 \
#                     --data ../shared/data/cnmc --width 0.25 --crop bbox --margin 0.08 \
#                     --scale-range 0.8,1.1
#                 then python -m export.cv with the same options (reuses the folds).
# Each variant has its own time limit so that a slow one cannot starve the rest; every fold's
# results are written as soon as it ends.
set -uo pipefail
out=${1:?output folder}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, keras, onnxruntime as ort; print('jax', jax.__version__, jax.devices(), \
'keras', keras.__version__, 'onnxruntime', ort.__version__, ort.get_available_providers())" || exit 1
nproc
recipe=(--pack .gpu/pack.npz --out "$out" --crop bbox --margin 0.08 --scale-range 0.8,1.1
        --workers "$(nproc)" --quiet)
run() {
    local limit=$1
    shift
    timeout "$limit" python3 -m export.train_jax "${recipe[@]}" "$@" 2>&1 \
        | grep -E "done|fold\(s\)|ERROR|Error|error" || true
}
run 170 --width 1.0 --name w1 --save-weights 0 --weights-dtype float16
run 90 --width 0.25 --name w0.25 --save-weights all
run 70 --width 0.25 --name w0.25-mixup --mixup 0.2 --save-weights none
run 80 --width 0.5 --name w0.5 --save-weights none
ls -la "$out"
