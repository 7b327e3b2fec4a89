# Source this first in a device call: `. benchmarks/device_env.sh`.
# The lent GPU machine has torch, triton, sympy, jinja2, hypothesis and numpy but no network; lark
# (psmc's parser) and the peers (accelerated-scan, fla-core) travel as wheels in the ignored
# folder .whl/ (named in the call's `carry`; see BENCHMARKS.md for the versions), installed here
# into /tmp/site. Prints the software and the card so every log says what it ran on.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
export PSMC_CACHE_DIR=/tmp/psmc-cache
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
