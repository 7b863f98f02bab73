#!/usr/bin/env bash
# The one prepared GPU check (issue 13): benchmarks/gpu_attention.py in full on a lent CUDA machine that has
# torch + Triton but no vLLM and no network. Prints versions, then the table; writes the JSON (and the PNG
# where matplotlib exists; else `python benchmarks/gpu_attention.py --plot <json>` here) under $OUT if set,
# else benchmarks/results/.
#
# Time: the sweep is 3 shapes x 3 batches x 3 contexts x (plain, CFG) = 54 cases. The largest case reads
# 64 images x 2 streams x 8,200 tokens of KV (Emu3: 8 heads x 128 x K,V x bf16 = 4 KiB/token, 4.3 GB; XL
# 5.4 GB) per call: ~1-2 ms at H200 bandwidth; flex's 16-query groups make it compute more, not read more.
# A case makes ~270 attention calls (4 timers x 38, 3 CUDA-graph timings x 41, each call <= a few ms),
# times 3 mask builds and checks float32 references: under ~2 s, so the 54 cases take 1-2 min. Compilation
# dominates: ~6 flex graphs per shape (dynamo's count on CPU with --quick) + ~4 in the 50-step run (dynamo
# on CPU), ~22 in all, at an unmeasured ~5-15 s each on this GPU: 2-5 min. Estimated total 3-7 min;
# --budget-s (330 s) stops starting new cases (LlamaGen-XL runs last), `timeout` (480 s) is the hard cap,
# and the JSON is rewritten after every case, so a cut run keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export ZIPAR_BENCH_RESULTS=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name())"
timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT_S:-480}" \
  "$PY" benchmarks/gpu_attention.py --budget-s "${GPU_CHECK_BUDGET_S:-330}" "$@"
status=$?
ls -la "$ZIPAR_BENCH_RESULTS"/gpu_attention_* 2>/dev/null || true
exit $status
