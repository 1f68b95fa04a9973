#!/usr/bin/env bash
# One batched GPU session (device tool): the gpu-marked tests, the bitsandbytes footprints on CUDA and the
# GPU cells of exercise 5. Needs the bitsandbytes wheel in .whl/ (see README, "GPU"). Writes logs to $OUT.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_session.log"
python3 -c "import torch, transformers, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bitsandbytes', b.__version__)" | tee -a "$OUT/gpu_session.log"
echo "== tests/methods/test_gpu.py" | tee -a "$OUT/gpu_session.log"
timeout 150 python3 tests/methods/test_gpu.py 2>&1 | tail -20 | tee -a "$OUT/gpu_session.log"
echo "== exercise 5 notebook code cells (grading mode)" | tee -a "$OUT/gpu_session.log"
PEFTLAB_GRADING=1 timeout 150 python3 -c "import json; ns={'__name__':'__main__'}; [exec(compile(''.join(c['source']), c['id'], 'exec'), ns) for c in json.load(open('solutions/ex5_qlora/ex5_qlora.ipynb'))['cells'] if c['cell_type']=='code']" > "$OUT/ex5_gpu_cells.log" 2>&1; echo "ex5 code cells exit $?" | tee -a "$OUT/gpu_session.log"
tail -30 "$OUT/ex5_gpu_cells.log"
echo "== bnb footprint on CUDA" | tee -a "$OUT/gpu_session.log"
timeout 200 python3 benchmarks/bnb_footprint.py --device cuda --models smollm2-135m --out "$OUT" 2>&1 | grep -v "Loading weights" | tail -25 | tee -a "$OUT/gpu_session.log"
ls "$OUT"
