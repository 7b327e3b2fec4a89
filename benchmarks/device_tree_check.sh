# One device call: the tree kernels checked on CUDA (check_tree_cuda.py), then bench_tree.py's
# table against the same-byte scan. Usage (repository root, .whl carried):
#   bash benchmarks/device_tree_check.sh    # $OUT/check_tree_cuda.txt, $OUT/tree.json, $OUT/tree_log.txt
. benchmarks/device_env.sh
mkdir -p "$OUT"
timeout 330 python3 benchmarks/check_tree_cuda.py 2>&1 | grep -v -i warn | tee "$OUT/check_tree_cuda.txt" | grep -v " ok$"
echo "check_tree_cuda: $(grep -c ' ok$' "$OUT/check_tree_cuda.txt") ok, $(grep -c 'FAIL' "$OUT/check_tree_cuda.txt") FAIL"
timeout 200 python3 benchmarks/bench_tree.py --configs 32x4 --out "$OUT" 2>&1 | tee "$OUT/tree_log.txt" | tail -8
