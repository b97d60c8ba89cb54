#!/usr/bin/env bash
# On a machine with a CUDA GPU, in at most about nine and a half minutes: the CUDA tests, the engine tests on the GPU,
# the in-process benchmark, the HTTP benchmark against `transformers serve` and the whole-cache A/B, in bfloat16.
#
#   scripts/gpu_check.sh MODEL_CONFIG_DIR [OUT_DIR]
#
# MODEL_CONFIG_DIR holds a model's config.json and tokenizer files (weights not needed): a model of that shape is
# built with random weights, which is enough for throughput (every request generates exactly --new-tokens tokens).
# Python packages the machine lacks (fastapi, pydantic-settings, ...) must already be importable, e.g. from wheels
# installed with `pip install --target DIR` and DIR on PYTHONPATH. Logs and the HTTP benchmark's table and numbers go
# to OUT_DIR (default: $OUT, else a new temporary folder), eight files at most; a summary is printed last.
#
# Steps, each under its own time limit so that one that hangs leaves the others their time:
#   1. tests/engine/test_cuda.py, and beside it every engine test (tests/engine, fast ones) with
#      PROMPT_SERVER_TEST_DEVICE=cuda: most of them then serve from the GPU in float32 and compare with PEFT (on the
#      GPU for the causal ones, on the CPU for the encoder-decoder and encoder ones)
#   2. the in-process benchmark (prompt_server_bench), 64 requests x 128 tokens, 20 and 100 virtual tokens
#   3. prompt-server bench --http at 32 clients, /v1/completions, against transformers serve --continuous-batching
#   4. scripts/whole_cache_ab.py: prefills allocating every layer's cache at once (the default on a GPU) against
#      layer by layer, each with adapters of 100 virtual tokens and without
#   5. with time left, the HTTP benchmark with prefix caching off, prompt-server alone
set -u
config_dir=${1:?usage: scripts/gpu_check.sh MODEL_CONFIG_DIR [OUT_DIR]}
out=${2:-${OUT:-$(mktemp -d)}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
t0=$SECONDS
stamp() { echo "[$((SECONDS - t0)) s] $*"; }
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    python3 -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0],
'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__,
'peft', peft.__version__)"
    echo "cpus $(nproc)"
} 2>&1 | tee "$out/env.txt"

model=$(mktemp -d)
stamp "random-weight model of $config_dir at $model (in the background)"
python3 - "$config_dir" "$model" >>"$out/env.txt" 2>&1 <<'PY' &
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
model_pid=$!

stamp "1. CUDA tests, and the engine tests on the GPU, side by side"
# Each pytest process gets two OpenMP threads: the workers share the machine's cores (with torch's default, each
# would start one thread per core). SIGINT at the limit, so that pytest still prints what failed until then.
export OMP_NUM_THREADS=2
timeout -s INT -k 20 150 python3 -m pytest -q -p no:cacheprovider -rA tests/engine/test_cuda.py \
    >"$out/cuda-tests.log" 2>&1 &
cuda_pid=$!
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 7" || echo "")
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90" || echo "")
PROMPT_SERVER_TEST_DEVICE=cuda timeout -s INT -k 20 190 python3 -m pytest -v --tb=short -p no:cacheprovider \
    -p no:benchmark -m "not slow" -rfE $workers $per_test --ignore=tests/engine/test_cuda.py tests/engine \
    >"$out/engine-cuda.log" 2>&1 &
engine_pid=$!
wait $model_pid; echo "model: rc $?" >>"$out/env.txt"
wait $cuda_pid; cuda_rc=$?
wait $engine_pid; engine_rc=$?
stamp "tests done: CUDA tests rc $cuda_rc, engine tests on the GPU rc $engine_rc"
unset OMP_NUM_THREADS

# Rounds of a few seconds: at 64 requests of 32 tokens a round lasted under a second on an H200, and the
# rounds of one mode differed by up to 2x.
stamp "2. in-process benchmark, cuda bfloat16, 64 requests x 128 tokens"
{
    timeout 90 python3 -m prompt_server_bench --model "$model" --device cuda --dtype bfloat16 --modes cdef \
        --rounds 2 --requests 64 --new-tokens 128 --virtual-tokens 20
    timeout 50 python3 -m prompt_server_bench --model "$model" --device cuda --dtype bfloat16 --modes de \
        --rounds 2 --requests 64 --new-tokens 128 --virtual-tokens 100
} >"$out/bench.log" 2>&1

stamp "3. HTTP benchmark, cuda bfloat16, 32 clients, /v1/completions, against transformers serve"
tf=$(mktemp)
cat >"$tf" <<'SH'
#!/bin/sh
exec python3 -c 'import sys; from transformers.cli.transformers import main; sys.argv[0] = "transformers"; sys.exit(main())' "$@"
SH
chmod +x "$tf"
# six requests per client: at two, a series lasted under two seconds on an H200
http=(python3 -m prompt_server_bench --http --model "$model" --device cuda --dtype bfloat16 --concurrency 32
      --requests-per-client 6 --rates "" --rounds 2 --endpoints completions --virtual-tokens 20,100)
timeout 150 "${http[@]}" --transformers-cmd "$tf" --out "$out/http" >"$out/http.log" 2>&1
http_rc=$?
# the device tool brings back 8 files at most: the table and http.log (every point's numbers and counters) suffice
rm -f "$out/http/bench-http.png" "$out/http/bench-http.json"
stamp "HTTP benchmark rc $http_rc"

stamp "4. whole-cache A/B, cuda bfloat16, 32 clients, 64 requests x 32 tokens per series and round"
timeout 80 python3 scripts/whole_cache_ab.py --model "$model" --device cuda --dtype bfloat16 --rounds 2 \
    --requests 64 >"$out/whole-cache-ab.log" 2>&1
stamp "whole-cache A/B rc $?"

# With time left: the HTTP benchmark with prefix caching off and prompt-server alone, so that no series reuses a
# prompt head (what the adapter series lose against no adapter, less what no adapter gains by sharing heads).
if [ $((SECONDS - t0)) -lt 480 ]; then
    stamp "5. HTTP benchmark, prefix caching off, prompt-server alone"
    PROMPT_SERVER_PREFIX_CACHE_BYTES=0 timeout 90 "${http[@]}" --skip-transformers --out "$(mktemp -d)" \
        >"$out/http-no-prefix-cache.log" 2>&1
    stamp "HTTP benchmark without prefix caching rc $?"
fi

echo "================ summary"
cat "$out/env.txt"
echo "== CUDA tests"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed|error" "$out/cuda-tests.log" | tail -15
echo "== engine tests on the GPU"; grep -E "^(FAILED|ERROR)|passed|failed|KeyboardInterrupt" "$out/engine-cuda.log" \
    | grep -v "^\[gw" | tail -25
echo "== in-process benchmark"; grep -v "Loading\|Writing\|warn\|it/s\]" "$out/bench.log" | tail -45
echo "== HTTP benchmark (the server's counters per point: $out/http.log)"
if [ -f "$out/http/bench-http.md" ]; then cat "$out/http/bench-http.md"; else tail -20 "$out/http.log"; fi
echo "== whole-cache A/B"; grep -v "Loading\|Writing\|warn\|it/s\]" "$out/whole-cache-ab.log" | tail -20
if [ -f "$out/http-no-prefix-cache.log" ]; then
    echo "== HTTP benchmark, prefix caching off"
    grep -v "Loading\|Writing\|warn" "$out/http-no-prefix-cache.log" | tail -16
fi
