import sys, torch, math
from pathlib import Path
from vtc.demo import train as T
from vtc.demo.build import build_tokenizer, build_grid_model, build_grid_processor
imgs, k = int(sys.argv[1]), int(sys.argv[2])
dev = T._setup(0, "cpu", 1)
log = T._Logger(Path(f"/work/toy/real_cells_{imgs}x{k}.log"))
tok = build_tokenizer(); model = build_grid_model(tok); proc = build_grid_processor(tok)
tower = model.model.vision_tower
sym = T.SymbolicPatches(model.config.text_config.hidden_size)
hp = {**T.GRID_DEFAULTS, "stage2_images": imgs}
T._train_vlm(model, proc, list(tower.parameters()) + list(model.model.multi_modal_projector.parameters()), hp, dev, log, 11,
             "cells where", lambda m, pv, s: sym.cells(s), Path("/tmp/unused"), extra_params=tuple(sym.parameters()),
             constant_lr=True, qas=k, needs_pixels=False, steps=int(sys.argv[3]), qtypes=("where",), own_first=False,
             n_image_tokens=9)
