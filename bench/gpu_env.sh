# Sourced by bench/gpu_check.sh and bench/gpu_quality.sh on a GPU machine that has torch and transformers but
# neither Ray nor DeepSpeed: $OUT, and the wheels carried in `.whl/` (pydantic and its parts, hjson,
# tensorboardX, datasets, dill, multiprocess, and DeepSpeed's sdist) installed under /tmp/site.
OUT=${OUT:-/tmp/atm-ray-gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz
  export PYTHONPATH=/tmp/site:$PWD
fi
