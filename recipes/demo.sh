#!/usr/bin/env bash
# Reproduce the shipped demo model, measure it, and copy it into the package.
# A 2-core CPU: about 80 minutes; one GPU: a few minutes (the same steps, so the same kind
# of model). Extra arguments go to `sdlab train` (e.g. --set steps=1000).
set -euo pipefail
cd "$(dirname "$0")/.."
sdlab make-dataset shapes demo-data/shapes --count 4000 --size 64 --seed 0 --hold-out
sdlab train recipes/demo.toml "$@"
python recipes/demo_eval.py demo-run/demo.safetensors
cp demo-run/demo.safetensors src/sdlab/demo/demo.safetensors
cp recipes/demo.toml src/sdlab/demo/recipe.toml
