. benchmarks/device_env.sh
mkdir -p $OUT
timeout 300 python3 -c "
import sys, torch; sys.path.insert(0, '.')
import psmc
from benchmarks.check_tree_cuda import check_one_pass
dev = torch.device('cuda'); gen = torch.Generator(device=dev).manual_seed(0)
bad = 0
for name in ('nonassoc_mix', 'softmax_agg'):
    op = psmc.compile_file(f'examples/{name}.psm')[name]
    bad += check_one_pass(op, name, dev, gen)
print('BAD', bad)
" 2>&1 | tee $OUT/check_one_pass.txt
timeout 250 python3 benchmarks/bench_tree.py --configs 32x4 --three-launch --out $OUT 2>&1 | tee $OUT/tree_log.txt | tail -30
