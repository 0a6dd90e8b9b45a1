#!/usr/bin/env bash
# The checks that need a CUDA GPU (issue 12). Not part of `make test`; run it on a GPU machine:
#   bash bench/gpu_check.sh            (from the repository root, with .venv set up)
# Writes bench/results/gpu-*.{json,md,log}. Nothing here has been run yet: the machine this
# was written on has no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=bench/results
mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%d-%H%M%S)
LOG="$OUT/gpu-$STAMP.log"
exec > >(tee "$LOG") 2>&1

nvidia-smi || { echo "no nvidia-smi: this is not a CUDA machine"; exit 1; }
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count(),
      torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
PY
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")

echo "== 1. the suite's device and distributed tests (gloo on CPU, then the CLI on CUDA)"
"$PY" -m pytest -q -x -p no:cacheprovider tests/test_distributed.py tests/test_tracking.py \
    tests/test_train_api.py tests/test_cli.py -m "not slow"

echo "== 2. the demo on one GPU (device auto = cuda:0, dtype auto = bfloat16 where supported)"
start=$(date +%s)
"$PY" -m softprompt train --output "$OUT/gpu-demo-$STAMP" --overwrite --device auto --dtype auto
echo "demo seconds: $(( $(date +%s) - start ))"

if [ "$NGPU" -ge 2 ]; then
    echo "== 3. the demo on 2 GPUs with torchrun (nccl), grad_accum 1 == 1 GPU with grad_accum 2"
    start=$(date +%s)
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m softprompt train \
        --output "$OUT/gpu-demo2-$STAMP" --overwrite --batch-size 16
    echo "2-GPU demo seconds: $(( $(date +%s) - start ))"
    "$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 -m softprompt train \
        --output "$OUT/gpu-demo2acc-$STAMP" --overwrite --batch-size 16
    "$PY" -m softprompt train --output "$OUT/gpu-demo1-$STAMP" --overwrite --batch-size 16 --grad-accum 2
    "$PY" - "$OUT/gpu-demo2-$STAMP" "$OUT/gpu-demo1-$STAMP" <<'PY'
import json, sys, torch
from safetensors.torch import load_file
a, b = (load_file(f"{d}/last/adapter_model.safetensors")["prompt_embeddings"] for d in sys.argv[1:])
print("max |2 GPUs - 1 GPU x grad_accum 2|:", float((a - b).abs().max()))
for d in sys.argv[1:]:
    print(d, json.load(open(f"{d}/results.json"))["tuned"])
PY
fi

echo "== 4. the bench (train step / forward / generate against PEFT)"
"$PY" bench/bench.py --out "$OUT" --name "gpu-$STAMP"
echo "done: $LOG"
