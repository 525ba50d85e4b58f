#!/usr/bin/env bash
# The GPU checks of proper-kernels in a few calls of the device tool, each under its
# 10-minute limit, all writing under $OUT (what comes back to the session):
#
#   bash python/gpu_session.sh tests      # install + build csrc/ + the whole suite (GPU tests run)
#   bash python/gpu_session.sh decode     # square-4096 decode T in {1,16,64,256}, 64 distinct users
#                                         # and more laws: every provider; writes this GPU's row of
#                                         # the decode dispatch table
#   bash python/gpu_session.sh prefill    # square-4096 fwd + fwdbwd T in {1024,8192} (peak memory too)
#   bash python/gpu_session.sh mlp        # llama-7b-mlp
#   bash python/gpu_session.sh e2e        # tokens/s of a stage-3 step and of generation
#   bash python/gpu_session.sh all        # first call of a session, most important first: the
#                                         # decode benchmark without torch-compile (its slow
#                                         # compiles) and the table, then the kernel tests (GPU +
#                                         # bf16; emulated and interpreter ones skipped: CI runs
#                                         # them); each under its own timeout, so that a slow part
#                                         # cannot take the 10 minutes of the call
#
# Files follow benchmarks/results/README.md: <gpu>-<date>-<preset>[-<op>].{csv,jsonl,txt};
# copy them to benchmarks/results/ and commit them with the session's note. The decode
# stage also returns $OUT/decode_table.json: copy it over proper_kernels/ops/ and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
stage=${1:-all}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' | sed -E 's/nvidia //; s/[^a-z0-9]+/-/g; s/-$//')
gpu=${gpu:-nogpu}
day=$(date +%F)
prefix="$OUT/$gpu-$day"

install() {
    # build/ is git-ignored, so the device machine keeps it between calls: install once.
    if [ ! -f build/.gpu-installed ]; then
        mkdir -p build
        # The CUDA extension is the point of a GPU session: a build that would be skipped
        # (no nvcc, no pybind11, a compile error) fails loudly here, and the session goes
        # on without it so that the Triton tests and benchmarks still run.
        if ! PROPER_KERNELS_REQUIRE_CUDA_BUILD=1 python -m pip install --no-deps --no-build-isolation -e . \
                > build/install.log 2>&1; then
            echo "!! the CUDA extension did not build (install.log); installing without it"
            tail -30 build/install.log
            python -m pip install --no-deps --no-build-isolation -e . >> build/install.log 2>&1 \
                || { tail -20 build/install.log; return 1; }
        fi
        touch build/.gpu-installed
    fi
    cp build/install.log "$OUT/install.log"
    { nvidia-smi; python -m proper_kernels.env; } > "$prefix-env.txt" 2>&1
    cat "$prefix-env.txt" | tail -12
}

bench() {  # bench NAME ARGS...: one benchmark run (at most $BENCH_TIMEOUT s), its command kept in the .cmd
    local name=$1; shift
    echo "\$ python benchmarks/run.py $* --output $prefix-$name" > "$prefix-$name.cmd"
    timeout "${BENCH_TIMEOUT:-560}" python benchmarks/run.py "$@" --no-progress --output "$prefix-$name" 2>&1 | tail -60
}

decode_bench() {  # decode_bench [ARGS...]: the decode cases, then this GPU's entry of the dispatch table
    bench square-4096-decode --preset square-4096 --op decode --decode-table proper_kernels/ops/decode_table.json "$@"
    cp proper_kernels/ops/decode_table.json "$OUT/decode_table.json"
}

kernel_tests() {  # kernel_tests SECONDS: the GPU kernel tests (CI already runs the emulated,
                  # interpreter, nvcc-build and ptxas ones; install has built the extension)
    timeout "$1" python -m pytest tests/test_cuda_decode.py tests/test_triton_fwd.py tests/test_triton_bwd.py \
        -q --maxfail=20 -rs -k "not emulat and not interpreter_suite and not build_check and not ptxas" 2>&1 \
        | tee "$prefix-tests.txt" | tail -30
}

case "$stage" in
    tests)   install && timeout 560 python -m pytest tests -q --maxfail=20 -rs -k "not interpreter_suite" 2>&1 \
                 | tee "$prefix-tests.txt" | tail -30 ;;
    decode)  install && decode_bench ;;
    prefill) install && bench square-4096-prefill --preset square-4096 --op fwd,fwdbwd ;;
    mlp)     install && bench llama-7b-mlp --preset llama-7b-mlp ;;
    e2e)     install && bench e2e --preset e2e ;;
    all)     install && { BENCH_TIMEOUT=300 decode_bench \
                          --providers base,reference,loop,torch,peft,triton,cuda,cuda-one
                      kernel_tests 200; } ;;
    *) echo "usage: $0 {tests|decode|prefill|mlp|e2e|all}" >&2; exit 2 ;;
esac
