#!/usr/bin/env bash
# Reproduce the shipped demo model (about 40 minutes on 2 CPU cores), then copy it into the package.
set -euo pipefail
cd "$(dirname "$0")/.."
sdlab make-dataset shapes demo-data/shapes --count 4000 --size 64 --seed 0
sdlab train recipes/demo.toml "$@"
cp demo-run/demo.safetensors src/sdlab/demo/demo.safetensors
cp recipes/demo.toml src/sdlab/demo/recipe.toml
