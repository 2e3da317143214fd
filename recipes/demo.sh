#!/usr/bin/env bash
# Reproduce the shipped demo model, measure it, and copy it into the package.
set -euo pipefail
cd "$(dirname "$0")/.."
sdlab make-dataset shapes demo-data/shapes --count 4000 --size 64 --seed 0
sdlab train recipes/demo.toml "$@"
python recipes/demo_eval.py demo-run/demo.safetensors 40
cp demo-run/demo.safetensors src/sdlab/demo/demo.safetensors
cp recipes/demo.toml src/sdlab/demo/recipe.toml
