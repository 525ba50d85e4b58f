#!/usr/bin/env bash
# The GPU checks of proper-kernels, sized for a lent GPU's 15 minutes of device time,
# machine start included. `all` is ONE call of at most 8 minutes; everything else is an
# optional second call. Every part runs under its own timeout and writes under $OUT (what
# comes back to the session), so a slow or failing part cannot take the others with it.
#
#   bash python/gpu_session.sh all     most important first (budget, seconds):
#       install   pip install -e . with csrc/ built for this GPU's arch only           150
#       decode    square-4096 decode, T in {1, 16, 64} x {distinct, uniform}: base,
#                 triton, cuda, cuda-one; writes this GPU's decode table              100
#       tests     the GPU kernel tests, bf16 included (CI runs the emulated,
#                 interpreter, nvcc-build and ptxas ones)                             110
#       prefill   square-4096 fwd and fwdbwd at T = 8192 (uniform): base, triton       60
#       e2e       tokens/s of a stage-3 training step and of generation                50
#   bash python/gpu_session.sh more    the second call: the rest of square-4096 (every
#                                      provider and law, T = 256, torch-compile),
#                                      llama-7b-mlp, the paged user bank (paged vs resident
#                                      tokens/s at Llama-7B-like dims), the whole test suite
#   bash python/gpu_session.sh install|decode|tests|prefill|e2e|mlp|paged    one part alone
#
# Files follow benchmarks/results/README.md: <gpu>-<date>-<preset>[-<part>].{csv,jsonl,txt,cmd};
# copy them to benchmarks/results/ and commit them with the session's note. The decode
# part also returns $OUT/decode_table.json: copy it over proper_kernels/ops/ and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
stage=${1:-all}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' | sed -E 's/nvidia //; s/[^a-z0-9]+/-/g; s/-$//')
gpu=${gpu:-nogpu}
prefix="$OUT/$gpu-$(date +%F)"
# The kernel test files; the -k filter leaves out what CI already runs on CPU.
KERNEL_TESTS="tests/test_cuda_decode.py tests/test_cuda_decode_op.py tests/test_triton_fwd.py tests/test_triton_bwd.py \
tests/test_autograd.py tests/test_lora_mixture.py tests/test_torch_backend.py"
CI_ONLY="not emulat and not interpreter_suite and not build_check and not ptxas"

install() {  # install SECONDS
    # The CPU kernels (csrc/cpu/) time nothing here and take ~40 s of the budget to
    # build; the tests see the variable too and skip the check that they are built.
    export PROPER_KERNELS_SKIP_CPU_BUILD=1
    # build/ is git-ignored, so the device machine keeps it between calls: install once.
    if [ ! -f build/.gpu-installed ]; then
        mkdir -p build
        # This GPU's arch alone: the build is the slowest part of the install.
        cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
        export PROPER_KERNELS_CUDA_ARCH_LIST=${PROPER_KERNELS_CUDA_ARCH_LIST:-${cap:-9.0}}
        # The CUDA extension is the point of a GPU session: a build that would be skipped
        # (no nvcc, no pybind11, a compile error) fails loudly here, and the session goes
        # on without it so that the Triton tests and benchmarks still run.
        if ! PROPER_KERNELS_REQUIRE_CUDA_BUILD=1 timeout "$1" python -m pip install --no-deps --no-build-isolation \
                -e . > build/install.log 2>&1; then
            echo "!! the CUDA extension did not build (install.log); installing without it"
            tail -30 build/install.log
            PROPER_KERNELS_SKIP_CUDA_BUILD=1 python -m pip install --no-deps --no-build-isolation -e . \
                >> build/install.log 2>&1 || { tail -20 build/install.log; return 1; }
        fi
        touch build/.gpu-installed
    fi
    cp build/install.log "$OUT/install.log"
    { nvidia-smi; python -m proper_kernels.env; } > "$prefix-env.txt" 2>&1
    tail -12 "$prefix-env.txt"
}

bench() {  # bench SECONDS NAME ARGS...: one benchmark run, its command kept in the .cmd
    local secs=$1 name=$2; shift 2
    echo "\$ python benchmarks/run.py $* --output $prefix-$name" > "$prefix-$name.cmd"
    timeout "$secs" python benchmarks/run.py "$@" --no-progress --output "$prefix-$name" 2>&1 | tail -80
}

decode() {  # decode SECONDS [ARGS...]: decode cases, then this GPU's entry of the dispatch table
    local secs=$1; shift
    bench "$secs" square-4096-decode --preset square-4096 --op decode \
        --decode-table proper_kernels/ops/decode_table.json "$@"
    cp proper_kernels/ops/decode_table.json "$OUT/decode_table.json"
}

kernel_tests() {  # kernel_tests SECONDS
    # shellcheck disable=SC2086
    timeout "$1" python -m pytest $KERNEL_TESTS -q --maxfail=20 -rs -k "$CI_ONLY" 2>&1 \
        | tee "$prefix-tests.txt" | tail -30
}

case "$stage" in
    all)     install 150 || exit 1
             decode 100 --case 7,8,9,10,11,12 --providers base,triton,cuda,cuda-one
             kernel_tests 110
             bench 60 square-4096-prefill --preset square-4096 --case 1,5 --providers base,triton
             bench 50 e2e --preset e2e ;;
    more)    install 300 || exit 1  # a no-op after `all` on the same machine
             decode 150 --case 13,14,15,16,17,18,19 --providers all
             bench 110 llama-7b-mlp --preset llama-7b-mlp
             bench 110 paged --preset paged
             timeout 170 python -m pytest tests -q --maxfail=20 -rs -k "not interpreter_suite" 2>&1 \
                 | tee "$prefix-suite.txt" | tail -30 ;;
    install) install 300 ;;
    decode)  install 300 && decode 560 ;;
    tests)   install 300 && kernel_tests 560 ;;
    prefill) install 300 && bench 560 square-4096-prefill --preset square-4096 --op fwd,fwdbwd ;;
    e2e)     install 300 && bench 560 e2e --preset e2e ;;
    mlp)     install 300 && bench 560 llama-7b-mlp --preset llama-7b-mlp ;;
    paged)   install 300 && bench 560 paged --preset paged ;;
    *) echo "usage: $0 {all|more|install|decode|tests|prefill|e2e|mlp|paged}" >&2; exit 2 ;;
esac
