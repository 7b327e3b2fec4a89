# One device call for the tree forward: variants with per-kernel times, then bench_tree.py's table
# against the same-byte scan. Usage (from the repository root, .whl carried):
#   bash benchmarks/device_tree.sh          # writes $OUT/variants.txt, $OUT/tree.json, $OUT/tree_log.txt
. benchmarks/device_env.sh
mkdir -p "$OUT"
timeout 240 python3 benchmarks/tree_variants.py 2>&1 | grep -v -i warn | tee "$OUT/variants.txt"
timeout 240 python3 benchmarks/bench_tree.py --configs 32x4 --out "$OUT" 2>&1 | tee "$OUT/tree_log.txt" | tail -16
