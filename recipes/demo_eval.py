"""Measure the demo model: one image per prompt "a <colour> <shape> on a <colour> background"
(fixed seeds) for every combination held out of its training set and as many seen ones, read
back with `classify_colours` and `classify_shape`.

Usage: python recipes/demo_eval.py MODEL [N_SEEN]   (default 25 seen combinations)"""

import itertools
import json
import sys

import numpy as np
import torch

from sdlab.checkpoints.loader import load_bundle
from sdlab.pipeline import Pipeline
from sdlab.training.shapes import COLOURS, HELD_OUT, SHAPES, caption_for, classify_colours, classify_shape

model, n_seen = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25
rng = np.random.default_rng(123)
seen = [c for c in itertools.product(SHAPES, COLOURS, COLOURS) if c[1] != c[2] and c not in HELD_OUT]
groups = {"held_out": sorted(HELD_OUT), "seen": [seen[i] for i in rng.choice(len(seen), n_seen, replace=False)]}
pipe = Pipeline(load_bundle(model, device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.float32))
report, rows, i = {}, [], 0
for group, combos in groups.items():
    hits = {"foreground": 0, "background": 0, "shape": 0}
    for shape, fg, bg in combos:
        img = pipe.txt2img(caption_for(shape, fg, bg), seed=1000 + i, steps=20, width=64, height=64, cfg_scale=5.0)[0]
        got_fg, got_bg = classify_colours(img)
        got_shape = classify_shape(img)
        hits["foreground"] += got_fg == fg
        hits["background"] += got_bg == bg
        hits["shape"] += got_shape == shape
        rows.append((group, shape, fg, bg, "->", got_shape, got_fg, got_bg))
        i += 1
    report[group] = {"n": len(combos), **{k: round(v / len(combos), 3) for k, v in hits.items()}}
print(json.dumps(report))
for r in rows:
    print(*r)
