#!/usr/bin/env bash
# On a machine with a CUDA GPU: the fast test suite (CUDA tests included) and the in-process benchmark in bfloat16.
#
#   scripts/gpu_check.sh MODEL_CONFIG_DIR
#
# MODEL_CONFIG_DIR holds a model's config.json and tokenizer files (weights not needed): a model of that shape is
# built with random weights, which is enough for throughput (every request generates exactly --new-tokens tokens).
# Python packages the machine lacks (fastapi, pydantic-settings, ...) must already be importable, e.g. from wheels
# installed with `pip install --target DIR` and DIR on PYTHONPATH.
set -u
config_dir=${1:?usage: scripts/gpu_check.sh MODEL_CONFIG_DIR}
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
model=$(mktemp -d)
python3 - "$config_dir" "$model" <<'PY'
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32).save_pretrained(dst)
for f in src.iterdir():
    if f.is_file() and f.name != "config.json":
        shutil.copy(f, dst / f.name)
print("random-weight model of", src, "at", dst)
PY
echo "== tests (CPU suite on this machine's transformers, plus tests/engine/test_cuda.py on the GPU)"
timeout 300 python3 -m pytest -q -p no:cacheprovider -m "not slow" --ignore=tests/e2e/test_clients.py tests 2>&1 | tail -25
echo "== CUDA tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rA tests/engine/test_cuda.py 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed"
echo "== bench, cuda bfloat16, 32 requests x 32 tokens, 8 and 100 virtual tokens"
timeout 200 python3 -m prompt_server_bench --model "$model" --device cuda --dtype bfloat16 --modes bcdef --rounds 2 \
    2>&1 | grep -v "Loading\|Writing\|warn" | tail -14
timeout 150 python3 -m prompt_server_bench --model "$model" --device cuda --dtype bfloat16 --modes cdef --rounds 2 \
    --virtual-tokens 100 2>&1 | grep -v "Loading\|Writing\|warn" | tail -12
echo "== bench, cuda bfloat16, 32 requests x 32 tokens, 8 virtual tokens: CUDA graphs off (PROMPT_SERVER_CUDA_GRAPHS=0)"
PROMPT_SERVER_CUDA_GRAPHS=0 timeout 150 python3 -m prompt_server_bench --model "$model" --device cuda \
    --dtype bfloat16 --modes de --rounds 2 2>&1 | grep -v "Loading\|Writing\|warn" | tail -8
