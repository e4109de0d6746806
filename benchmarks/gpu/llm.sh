#!/usr/bin/env bash
# The LLM comparison with a larger model on one GPU, as one run with its own time limits.
#
# Run from the repository root on a GPU machine with torch (CUDA) and transformers but no
# network (torchrl and tensordict come as wheels in .whl/, filled by wheels.sh, when missing;
# the package is used from the tree). It warm-starts a 6-layer, 512-wide model of the same
# character-level family on the harder setting of the default task, 3-digit reversed addition
# (the 2-layer CPU model does not learn it), stopped once sampling solves 30% of held-out sums,
# runs R2VPO (with reuse), GRPO and GRPO with the same reuse, 3 seeds each, in parallel
# processes, then measures R2VPOLLMLoss vs GRPOLoss time and
# peak memory on 64 x 512 tokens. Results go to $OUT/llm (or the first argument):
# summary.md, curves.png and llm.tgz (every run's curve and log, the warm start's log and
# the loss-cost JSON).
#
#   bash benchmarks/gpu/llm.sh [OUT_DIR] [example arguments, e.g. --lr 2e-5]
set -uo pipefail
out=${OUT:-/tmp}/llm
if [[ $# -gt 0 && $1 != --* ]]; then out=$1; shift; fi
work=/tmp/llm-gpu
mkdir -p "$out" "$work/runs"
if ! python3 -c "import torchrl, tyro" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
methods=(r2vpo grpo grpo-reuse)
run=(--rollouts 16384 --methods "${methods[@]}" --seeds 0 1 2 --out "$work/runs")
example=(--model "$work/model" --device cuda --difficulty 3 --num-prompts 64 --group-size 8
         --minibatch-size 128 --eval-every 2048 --checkpoint-every 4096 --num-test 1024 "$@")
{
    timeout 180 python3 -m torchrl_r2vpo.math_task --out "$work/model" --device cuda \
        --hidden-size 512 --layers 6 --task reversed-addition --difficulty 3 --steps 6000 \
        --batch-size 256 --lr 1e-3 --stop-at-sampled-accuracy 0.3 --check-every 100 \
        --eval-size 1024 --threads 4
    timeout -k 10 300 python3 benchmarks/llm_compare.py "${run[@]}" --jobs 9 "${example[@]}"
    python3 benchmarks/llm_compare.py "${run[@]}" --report-only
    timeout 90 python3 benchmarks/llm_loss_cost.py --device cuda --hidden 512 --layers 6 \
        --vocab 32768 --repeats 20 --json "$work/runs/llm_loss_cost_cuda.json"
} 2>&1 | tee "$work/runs/log.txt"
cp "$work/runs/summary.md" "$work/runs/curves.png" "$out/" 2>/dev/null
tar czf "$out/llm.tgz" --exclude=checkpoint.pt -C "$work" runs
