#!/usr/bin/env bash
# Issue 4's profile sweep on one H100, from the repository root (e.g. through the device tool):
# every registered mixer and op, T = 1K..64K, fwd and fwd+bwd, bf16, H = 16, D = 128, 65,536
# tokens per step, causal self, with flash-linear-attention 0.6.0 and FlexAttention beside it.
#
# One call cannot hold it all: on a fresh machine fla's Triton autotuning alone took, at first
# call (H100, Triton 3.6), 29-83 s per op forward and 172 s (chunk_simple_gla) and 297 s
# (chunk_gla) forward+backward. So the sweep comes in parts, one device call each, each ending
# within 9 minutes (--budget-s 450: points left when it runs out are recorded as skipped):
#   PART=seqmix      every op and mixer, the SDPA and plain baselines, FlexAttention (default)
#   PART=fla-simple  fla chunk_simple_gla and chunk_linear_attn beside gated_linear_attention
#   PART=fla-gla     fla chunk_gla beside gated_linear_attention
#   PART=fla-delta   fla chunk_gated_delta_rule beside delta_rule
#   PART=step        issue 8: one decoding step of every op and mixer after a context of 1K..1M
#                    tokens, batch 1 and 64 (KV caches until memory runs out)
# Each writes profile.db, profile.md, two plots and profile.log under $OUT (default
# ./profile_out). Merge the parts into one report afterwards, on any machine:
#   python -m seqmix.cli profile --report-only --db DIR/profile.db --merge PART1/profile.db ... --out DIR
# fla comes from wheels in .whl/ when present (fla-core and flash-linear-attention, carried with
# the call); without them the report lists the fla peers as not installed. In a copied tree (no
# .git, or a stale one), set SEQMIX_GIT_REVISION to the commit. Extra arguments override the
# defaults, e.g. a CPU dry run:
#   bash benchmarks/profile_h100.sh --device cpu --lengths 64,128 --heads 2 --head-dim 16 --tokens 256
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./profile_out}"
PART="${PART:-seqmix}"
mode=fwd,fwdbwd
lengths=1024,2048,4096,8192,16384,32768,65536
case "$PART" in
    seqmix) select=(--ops all --mixers all --peers torch.flex_attention) ;;
    step) select=(--ops all --mixers all --peers none); mode=step; lengths=1024,16384,262144,1048576 ;;
    fla-simple) select=(--ops gated_linear_attention --mixers none --peers fla.chunk_simple_gla,fla.chunk_linear_attn) ;;
    fla-gla) select=(--ops gated_linear_attention --mixers none --peers fla.chunk_gla) ;;
    fla-delta) select=(--ops delta_rule --mixers none --peers fla.chunk_gated_delta_rule) ;;
    *) echo "PART must be seqmix, fla-simple, fla-gla, fla-delta or step, got '$PART'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -m seqmix.cli profile "${select[@]}" --patterns CS --mode "$mode" \
    --lengths "$lengths" --tokens 65536 --heads 16 --head-dim 128 --dtype bf16 \
    --device cuda --window 1024 --warmup-ms 10 --rep-ms 40 --time-cap-s 3 --budget-s 450 \
    --lift-fla-guard --out "$OUT" --db "$OUT/profile.db" "$@" 2>&1 | tee "$OUT/profile.log"
