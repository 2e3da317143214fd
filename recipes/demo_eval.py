"""Measure the demo model: one image per prompt "a <colour> <shape> on a <colour> background"
(fixed seeds), colours read back with `classify_colours`. Usage: python recipes/demo_eval.py MODEL [N]"""

import itertools
import json
import sys

import numpy as np
import torch

from sdlab.checkpoints.loader import load_bundle
from sdlab.pipeline import Pipeline
from sdlab.training.shapes import COLOURS, SHAPES, caption_for, classify_colours

model, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
rng = np.random.default_rng(123)
combos = [c for c in itertools.product(SHAPES, COLOURS, COLOURS) if c[1] != c[2]]
picks = [combos[i] for i in rng.choice(len(combos), n, replace=False)]
pipe = Pipeline(load_bundle(model, device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.float32))
fg_ok = bg_ok = 0
rows = []
for i, (shape, fg, bg) in enumerate(picks):
    img = pipe.txt2img(caption_for(shape, fg, bg), seed=1000 + i, steps=20, width=64, height=64, cfg_scale=5.0)[0]
    got_fg, got_bg = classify_colours(img)
    fg_ok += got_fg == fg
    bg_ok += got_bg == bg
    rows.append((shape, fg, bg, got_fg, got_bg))
print(json.dumps({"n": n, "foreground": fg_ok / n, "background": bg_ok / n}))
for r in rows:
    print(*r)
