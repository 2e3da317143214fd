set -e
export PYTHONPATH=$PWD/src:$PWD
nvidia-smi -L
python3 -c "import sdlab.training.trainer, sdlab.pipeline" 
python3 -c "from sdlab.training.shapes import make_shapes_dataset as m; m('demo-data/shapes', 4000, size=64, seed=0)"
python3 -c "
import logging; logging.basicConfig(level=logging.INFO)
from sdlab.training.config import load_config; from sdlab.training.trainer import train
print(train(load_config('recipes/demo.toml')))" 2>&1 | tr '\r' '\n' | grep -v '^train:' | tail -20
tail -3 demo-run/log.csv
cp demo-run/demo.safetensors demo-run/log.csv $OUT/
cp demo-run/samples/*.png $OUT/ 2>/dev/null || true
timeout 60 python3 recipes/demo_eval.py demo-run/demo.safetensors 40 > $OUT/eval.txt 2>&1 || true
head -1 $OUT/eval.txt
