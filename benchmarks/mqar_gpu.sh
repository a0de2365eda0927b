#!/usr/bin/env bash
# Zoology's MQAR on one GPU: softmax, gla, mamba2, gated_deltanet and hyena at d_model 64, 128 and
# 256 and (length, kv pairs) (64, 4), (128, 8), (256, 16), (512, 64), one learning rate (2.15e-3,
# from Zoology's grid), Zoology's batch sizes (512/512/256/128 by length), at most MAX_STEPS
# optimizer steps (default 800) with an early stop at 0.99 held-out accuracy (checked every 100
# steps on 1,000 examples). Zoology trains 100k examples for up to 64 epochs at four learning
# rates (up to 12,500 steps at length 64): this budget is cut to fit one 10-minute device call.
#
# The models are small, so one run leaves most of the GPU idle: one process per mixer (two for
# gated_deltanet, whose delta rule runs in chunked PyTorch) share the GPU and the results store
# (SQLite in WAL mode). Their tokens/s are therefore measured under sharing: compare them with
# each other, not with other runs. Runs a process had not finished when the time ran out are not
# in the store; rerunning the script resumes them. Extra arguments go to every `seqmix bench`.
# Writes the store, report.md, the plots and runs.csv under $OUT (default benchmarks/results/mqar).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/mqar}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
bench() {
    timeout "${RUN_S:-540}" python3 -m seqmix.cli bench --suite mqar --device cuda --db "$out/bench.db" lr=2.1544e-3 \
        train_size=100000 epochs=64 "max_steps=${MAX_STEPS:-800}" eval_every=100 eval_size=1000 "$@"
}
for mixer in softmax gla mamba2 hyena; do
    bench --mixers "$mixer" 'd_model=[64,128,256]' "$@" > "$out/$mixer.log" 2>&1 &
done
bench --mixers gated_deltanet 'd_model=[64,128]' "$@" > "$out/gated_deltanet_64_128.log" 2>&1 &
bench --mixers gated_deltanet d_model=256 "$@" > "$out/gated_deltanet_256.log" 2>&1 &
wait
# fold the write-ahead log into the store, so that the one file holds every finished run
python3 -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('PRAGMA wal_checkpoint(TRUNCATE)')" "$out/bench.db"
python3 -m seqmix.cli report --db "$out/bench.db" --out "$out"
