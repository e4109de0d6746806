#!/usr/bin/env bash
# R2VPO vs clipped PPO on MuJoCo Playground on one GPU, as one run with its own time limits.
#
# Run from the repository root on a GPU machine that has Python 3.12 with CUDA builds of torch
# and jax but no network: the cp312 wheels of torchrl, tensordict, mujoco, mujoco-mjx,
# playground and their missing dependencies are installed from .whl/ (filled beforehand by
# benchmarks/gpu/wheels.sh where PyPI is reachable), the package itself is used from the tree.
# The whole script keeps to TOTAL seconds (default 560): benchmarks/playground_compare.py gets
# what is left after the installation, less UPDATE_STEP seconds (default 120) kept for
# benchmarks/update_step.py, which then times the example's R2VPO update step eager and
# compiled at the preset's minibatch of 30720 in whatever time remains (skipped under 60 s).
# Results go to $OUT (or the first argument): results.json, summary.md, curves.png, log.txt and
# update_step/; other arguments go to benchmarks/playground_compare.py (--compile included).
#
#   bash benchmarks/gpu/playground.sh [OUT_DIR] [--compile --tasks CartpoleSwingupSparse ...]
#
# .whl/ is not tracked: the device tool copies it only when the call names it in carry
# ([".whl"]). The machine's start and idle time count against the session's device time too:
# give TOTAL about 150 s less than the time left, and the call a timeout of TOTAL + 30.
set -uo pipefail
start=$SECONDS
out=${OUT:-/tmp/playground}
if [[ $# -gt 0 && $1 != --* ]]; then out=$1; shift; fi
mkdir -p "$out"

export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MUJOCO_GL=disable \
    XLA_PYTHON_CLIENT_PREALLOCATE=false
if ! python3 -c "import mujoco_playground, torchrl, tyro" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "no wheels in .whl/: fill it with benchmarks/gpu/wheels.sh and carry it" | tee "$out/log.txt"
        exit 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    timeout 120 python3 -c "
import jax, mujoco, tensordict, torch, torchrl
print('torch', torch.__version__, torch.cuda.get_device_name(), '| jax', jax.__version__,
      jax.devices(), '| torchrl', torchrl.__version__, '| tensordict', tensordict.__version__,
      '| mujoco', mujoco.__version__)" 2>&1 | grep -v Warning
    # the benchmark keeps to its --budget; the timeout is the backstop
    budget=$(( ${TOTAL:-560} - (SECONDS - start) - ${UPDATE_STEP:-120} - 20 ))
    echo "benchmark budget: $budget s"
    # the deadline counts from here, the Python imports included
    timeout -k 10 $(( budget + 20 )) python3 benchmarks/playground_compare.py \
        --out "$out" --runs-dir /tmp/playground-runs --deadline $(( $(date +%s) + budget )) "$@"
    echo "exit status $?"
    left=$(( ${TOTAL:-560} - (SECONDS - start) - 10 ))
    if (( left >= 60 )); then
        timeout -k 5 "$left" python3 benchmarks/update_step.py --device cuda --losses r2vpo \
            --minibatch-sizes 30720 --steps 50 --repeats 3 --out "$out/update_step"
        echo "update_step exit status $?"
    fi
} 2>&1 | tee "$out/log.txt"
