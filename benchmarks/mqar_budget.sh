#!/usr/bin/env bash
# MQAR at a longer budget on one GPU (calls 3-5 of benchmarks/results/mqar_h100): the mqar suite's
# tasks of the lengths in LENGTHS (default "128 256"), widths WIDTHS (default "128 256"), mixers
# MIXERS (default: the suite's five), lr 2.15e-3, at most MAX_STEPS steps (default 2000; the cosine
# decay ends there) with the early stop at 0.99 checked every 100 steps. One process per (mixer,
# width), all sharing the GPU and the store; finished runs are skipped (resume). Writes under $OUT
# (default benchmarks/results/mqar): bench.db, one log per process, report.md, plots, runs.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/mqar}"
steps="${MAX_STEPS:-2000}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
suite="$out/mqar_lengths.toml"  # the mqar suite (same name: same run ids) with only those lengths
python3 - "$suite" ${LENGTHS:-128 256} <<'PY'
import sys
from seqmix.bench.config import SUITES_DIR
head, *tasks = (SUITES_DIR / "mqar.toml").read_text().split("[[tasks]]")
keep = [t for t in tasks if any(f"seq_len = {n}," in t for n in sys.argv[2:])]
open(sys.argv[1], "w").write(head + "".join("[[tasks]]" + t for t in keep))
PY
for mixer in ${MIXERS:-softmax gla mamba2 hyena gated_deltanet}; do
    for d in ${WIDTHS:-128 256}; do
        timeout "${RUN_S:-540}" python3 -m seqmix.cli bench --suite "$suite" --mixers "$mixer" --device cuda --db "$out/bench.db" \
            lr=2.1544e-3 train_size=100000 epochs=64 eval_every=100 eval_size=1000 "max_steps=$steps" "d_model=$d" \
            > "$out/${mixer}_${d}_${steps}.log" 2>&1 &
    done
done
wait
python3 -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('PRAGMA wal_checkpoint(TRUNCATE)')" "$out/bench.db"
python3 -m seqmix.cli report --db "$out/bench.db" --out "$out"
