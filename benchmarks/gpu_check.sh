#!/usr/bin/env bash
# GPU check: throughput and MFU of one DreamPRM bi-level iteration on the real Qwen2-VL-2B
# shapes (random weights, initialised on the device), per hypergradient method.
#
#     bash benchmarks/gpu_check.sh                 # from the repository root
#     OUT=/some/dir bash benchmarks/gpu_check.sh   # results there (default benchmarks/results/gpu)
#
# Needs: one CUDA GPU (H100-class, >= 80 GB), Python >= 3.11 with jax[cuda12] and this
# project's dependencies (flax, optax, numpy, transformers, ...) already installed; no
# network (nothing is downloaded; the repository is used in place via PYTHONPATH, no
# `pip install`). torch is not needed (the PyTorch reference is a CPU/small-config
# comparison: python -m benchmarks.step_throughput).
#
# What it runs (at most ~11 minutes): for each of exact_reversible:in_place=true, darts, exact_lowmem, exact a separate
# process (so an out-of-memory in one does not stop the others, each with a time limit)
#     python -m benchmarks.step_throughput --config qwen2_vl_2b --device gpu --methods <m>
# i.e. bfloat16 compute, float32 master weights and AdamW state, per-block remat "full",
# B = 1 training sample (one 448x448 image = 256 image tokens, 1024 tokens) per inner step,
# T = 5 inner AdamW steps, one meta chain of 4 step prefixes (<= 1024 tokens each), then
# the hypergradient and the meta AdamW step: one compiled, donated program per method.
# Reported per method: compile time, median / spread of 5 iterations after 1 warm-up,
# iterations/s, samples/s, tokens/s, model FLOPs per iteration (jaxpr count: matmuls, loops
# multiplied out, second-order terms included; XLA's cost_analysis flops also recorded) and
# MFU against --peak-tflops (default 989.4: H100 SXM bf16 dense; set PEAK_TFLOPS for another
# card, e.g. 989.4 for H200 too). Expect `exact` (reverse mode through 5 steps keeps 5 copies
# of parameters + AdamW moments; XLA:CPU's estimate for this program, `python -m
# benchmarks.memory`: 211.5 GiB unrolled with second_order="mixed", 315 GiB with the looped
# scan) and `exact_lowmem` (133.5 GiB) to fail with RESOURCE_EXHAUSTED on one 80 GB card:
# that is a result, recorded as such (`darts`: 50.0 GiB). A 141 GB H200 is just short for
# `exact_lowmem` too (133.5 GiB = 143 GB), by XLA:CPU's estimate. `exact_reversible` (the same
# hypergradient over the inverted AdamW steps, flat in T) is estimated at 71.6 GiB with its option
# in_place=true (within an 80 GB card) and 89.1 GiB without it (within an H200).
#
# Knobs (environment): OUT, PEAK_TFLOPS, PER_METHOD_S (time limit per method, default 155),
# METHODS (default "exact_reversible:in_place=true darts exact_lowmem exact"; NAME:KEY=VALUE sets a
# method option), EXTRA_ARGS (appended to every
# step_throughput call; the last occurrence of a flag wins, e.g. "--text-layers 14"),
# exact's T = 5 inner steps are unrolled, as the qwen2_vl_2b preset trains (its loop's residual
# stacks cost memory; the other methods loop, their smaller program); EXTRA_ARGS="--no-unroll-inner"
# times exact's loop instead.
# ALLOW_CPU=1 (run without a GPU: only to rehearse the script, e.g.
# ALLOW_CPU=1 EXTRA_ARGS="--config demo --device cpu --batch 2" bash benchmarks/gpu_check.sh).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989.4}"
PER_METHOD_S="${PER_METHOD_S:-155}"
METHODS="${METHODS:-exact_reversible:in_place=true darts exact_lowmem exact}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not available"; } \
  | tee "$OUT/nvidia_smi.txt"
EXTRA_ARGS="${EXTRA_ARGS:-}"
python - <<'EOF' || [ "${ALLOW_CPU:-0}" = 1 ] || { echo "gpu_check: JAX sees no GPU (install jax[cuda12])"; exit 2; }
import jax
print("jax", jax.__version__, jax.devices())
assert jax.default_backend() == "gpu", jax.default_backend()
EOF

for m in $METHODS; do
  echo "=== $m (limit ${PER_METHOD_S}s) ==="
  timeout --signal=KILL "$PER_METHOD_S" python -m benchmarks.step_throughput --config qwen2_vl_2b --device gpu \
      --methods "$m" --no-torch --no-inner-step --warmup 1 --repeats 5 --peak-tflops "$PEAK_TFLOPS" \
      --out "$OUT/step_throughput_2b_$m.json" $EXTRA_ARGS 2>&1 | grep -v "^WARNING" | tee "$OUT/step_throughput_2b_$m.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || echo "gpu_check: $m exited with status $rc (137 = time limit)" | tee -a "$OUT/step_throughput_2b_$m.log"
done

python - "$OUT" $METHODS <<'EOF'
import json, os, sys
out, methods = sys.argv[1], sys.argv[2:]
print("\nQwen2-VL-2B bi-level iteration (B=1, 1024 tokens, 448px image, T=5, meta 1x4), random weights")
print(f"{'method':<14} {'compile s':>9} {'median s':>9} {'spread %':>8} {'it/s':>7} {'tok/s':>8} "
      f"{'model TFLOP':>11} {'TFLOP/s':>8} {'MFU %':>6}  temp GB")
summary = {}
for m in methods:
    path = os.path.join(out, f"step_throughput_2b_{m}.json")
    if not os.path.isfile(path):
        print(f"{m:<14} no result (time limit or crash; see {m} log)")
        summary[m] = {"error": "no result"}
        continue
    r = json.load(open(path))["jax"].get(m, {})
    summary[m] = r
    if "error" in r:
        print(f"{m:<14} {r['error'][:100]}")
        continue
    mem = (r.get("memory") or {}).get("temp_size_in_bytes")
    print(f"{m:<14} {r['compile_s']:9.1f} {r['median_s']:9.3f} {r['spread_pct']:8.1f} {r['iterations_per_s']:7.3f} "
          f"{r['train_tokens_per_s']:8.0f} {r['model_flops'] / 1e12:11.1f} {r.get('achieved_tflops', 0):8.1f} "
          f"{100 * r.get('mfu', 0):6.2f}  {'' if mem is None else f'{mem / 2**30:.1f}'}")
print("MFU = model FLOPs (matmul FLOPs of the iteration's jaxpr, loops multiplied out, no remat recomputation; "
      "exact_lowmem counted as exact) / median time / peak. XLA cost_analysis flops: xla_cost_analysis_flops in the JSON.")
json.dump(summary, open(os.path.join(out, "gpu_check_summary.json"), "w"), indent=2, default=str)
EOF
