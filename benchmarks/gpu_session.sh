#!/usr/bin/env bash
# Every GPU figure the open work waits for, in one call on a GPU machine (expected under 10
# minutes on an H200), most wanted first, each benchmark under its own time limit so one that
# overruns does not cost the others:
#
#   bash benchmarks/gpu_session.sh [OUT]       # from the repo root; OUT: benchmarks/results
#
# OUT receives two files only (the device tool brings back at most 8): gpu-results.tar.gz,
# every benchmark's <command>-<machine>-<date>.{md,json,png}, refreshed after each one, and
# gpu-session.log, everything printed, written as it goes — the rows a benchmark prints
# survive it being cut at its limit, when its own files are never written.
#
# 1. memory: the peak of a training step on the 130M config for torch AdamW and Muon /
#    GaLoreAdamW at int8 with and without step_in_backward, and the largest of the 1B/3B/7B
#    configs whose step fits in 24 GiB per row (GaLore's 7B headline; a binary search, two
#    models built and stepped per row) (issue 15);
# 1b. memory --simulate 1B and 7B --validate: the fake-tensor simulation's rows run for real beside it
#    (torch.cuda.max_memory_allocated), GaLore's 7B recipe (issue 27);
# 2. step --sets 1B with int8 state: Muon and GaLoreAdamW's step at int8 next to AdamW (the
#    codes' eager ops on a GPU) (issue 15), in its own folder int8/;
# 3. step --sets 1B: every optimizer's step, refresh and peak memory on the LLaMA-1B matrix
#    set (issue 4: GaLore amortized <= 2x fused AdamW, fp32/bf16 projections, two bucket caps;
#    issue 6: Muon vs torch.optim.Muon); the low-rank peers are in the table only where they
#    are installed: they are pure Python, so carry their wheels (`pip download --no-deps
#    galore-torch==1.0 apollo-torch==1.0.3 pytorch-optimizer==4.1.0 -d .whl` here); a .whl/
#    folder in the repo root is installed first;
# 4. lowrank: refresh time and captured energy, ours vs torch.linalg.svd/svd_lowrank, and the
#    p×p eigh candidates (device, host, MAGMA, one thread/stream per matrix) next to where
#    lowrank_svd runs that eigh (host or device) (issue 7);
# 5. ns: Newton-Schulz kernels vs the torch twin and torch.optim.Muon, accuracy, Muon step,
#    with the candidates: symmetric products by cuBLAS block rows, a 4-step schedule (issue 6);
# 6. projection: GaLore's projection error against float64 and time, fp32 vs bf16 operands,
#    batched vs per matrix (issue 4; the errors are already measured on CPU, so it comes after
#    the figures only a GPU gives);
# 7. dct: matmul vs FFT DCT scores on CUDA (FFT_MIN_SIZE has no CUDA entry yet);
# 8. distributed: what the DDP/FSDP2 code path costs on one GPU (world size 1, NCCL).
# The limits add up to ~26 min, more than one 10-minute device command: the order is by priority, so a
# command cut at its limit loses only the last ones (the first two fit in 8 min); a second
# call can run the rest (`SKIP=3 bash benchmarks/gpu_session.sh`: skip the first three).
set -u
shopt -s nullglob
dest=${1:-benchmarks/results}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
out=$(mktemp -d)   # the benchmarks' own files, bundled into $dest
exec > >(tee -a "$dest/gpu-session.log") 2>&1
export PYTHONUNBUFFERED=1
# Offline: no build isolation (it would fetch setuptools). If pip cannot install at all,
# import the tree through a package folder of links (optim/ is matrixopt, kernels/ its .kernels).
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
if ! python3 -c "import matrixopt.kernels" 2>/dev/null; then
    site=$(mktemp -d)
    mkdir "$site/matrixopt"
    ln -s "$PWD"/optim/* "$site/matrixopt/"
    ln -s "$PWD/kernels" "$site/matrixopt/kernels"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    python3 -c "import matrixopt.kernels" || { echo "!! cannot import matrixopt"; exit 1; }
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps .whl/*.whl || echo "!! could not install the carried wheels"
fi

# After each benchmark, so that a call cut short still brings back what finished.
bundle() {
    local files
    mapfile -t files < <(cd "$out" && find . -type f \( -name '*.md' -o -name '*.json' -o -name '*.png' \) |
        sed 's|^\./||' | sort)
    ((${#files[@]})) || return 0
    tar czf "$dest/gpu-results.tar.gz.part" -C "$out" "${files[@]}" &&
        mv "$dest/gpu-results.tar.gz.part" "$dest/gpu-results.tar.gz"
}

skip=${SKIP:-0}
run() {
    local limit=$1
    shift
    if ((skip > 0)); then
        skip=$((skip - 1))
        echo "== skipped: $*"
        return 0
    fi
    echo "== $* (limit ${limit} s)"
    timeout "$limit" "$@" || echo "!! exit $? from: $*"
    bundle
}

run 240 python3 -m benchmarks memory --config 130M --precisions int8 --fit-budget-gib 24 --fit-configs 1B 3B 7B \
    --optimizers torch.optim.AdamW matrixopt.Muon matrixopt.GaLoreAdamW --out "$out"
# issue 27: the fake-tensor simulation beside the real step (max_memory_allocated), GaLore's
# recipe (bf16, checkpointing, rank 1024, batch 16 x 256) on 1B, then 7B's int8 rows
run 240 python3 -m benchmarks memory --simulate 1B --validate --batch 16 --seq-len 256 --checkpoint --rank 1024 \
    --precisions int8 --optimizers torch.optim.AdamW matrixopt.Muon matrixopt.GaLoreAdamW --out "$out"
run 300 python3 -m benchmarks memory --simulate 7B --validate --batch 16 --seq-len 256 --checkpoint --rank 1024 \
    --precisions int8 --optimizers matrixopt.Muon matrixopt.GaLoreAdamW matrixopt.DCTAdamW --out "$out"
mkdir -p "$out/int8"
run 90 python3 -m benchmarks step --sets 1B --repeats 5 --optimizers torch.optim.AdamW \
    "matrixopt.Muon[state_precision='int8']" "matrixopt.GaLoreAdamW[state_precision='int8']" --out "$out/int8"
run 240 python3 -m benchmarks step --sets 1B --repeats 10 --out "$out"
run 120 python3 -m benchmarks.lowrank --out "$out"
run 180 python3 -m benchmarks.ns --out "$out"
run 90 python3 -m benchmarks.projection --out "$out"
run 45 python3 -m benchmarks.dct --out "$out"
run 60 python3 -m benchmarks.distributed --out "$out"
echo "== bundled into $dest/gpu-results.tar.gz"
