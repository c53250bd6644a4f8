import sys, torch, numpy as np
sys.path.insert(0, "/work/main")
from vtc.demo.build import build_tokenizer, build_grid_model, build_grid_processor
from vtc.demo.train import stage1_tower, _Logger, GRID_DEFAULTS, DEFAULT_LOG_DIR
from vtc.demo.task import get_sample, COLORS, SHAPES
from pathlib import Path
torch.set_num_threads(1)
tok = build_tokenizer(); model = build_grid_model(tok); proc = build_grid_processor(tok)
tower = model.model.vision_tower
stage1_tower(tower, proc, GRID_DEFAULTS, torch.device("cpu"), _Logger(Path("/tmp/exp/probe.log")), 0, "grid", DEFAULT_LOG_DIR, True)
tower.eval()
def data(split, n):
    X = {l: [] for l in (-1, -2, -3)}; yc, ys = [], []
    for i in range(0, n, 50):
        ss = [get_sample(split, j) for j in range(i, i + 50)]
        pv = proc.image_processor([s.image for s in ss], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hs = tower(pv, output_hidden_states=True).hidden_states
        for b, s in enumerate(ss):
            for o in s.scene:
                p = 1 + int(o.cy // 8) * 14 + int(o.cx // 8)
                for l in X: X[l].append(hs[l][b, p])
                yc.append(list(COLORS).index(o.color)); ys.append(SHAPES.index(o.shape))
    return {l: torch.stack(v) for l, v in X.items()}, torch.tensor(yc), torch.tensor(ys)
Xtr, ctr, str_ = data("train", 600); Xva, cva, sva = data("val", 200)
for l in (-1, -2, -3):
    for name, ytr, yva, n in (("color", ctr, cva, 6), ("shape", str_, sva, 4)):
        lin = torch.nn.Linear(128, n); opt = torch.optim.Adam(lin.parameters(), 1e-2)
        mu, sd = Xtr[l].mean(0), Xtr[l].std(0) + 1e-5
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(lin((Xtr[l] - mu) / sd), ytr); opt.zero_grad(); loss.backward(); opt.step()
        acc = (lin((Xva[l] - mu) / sd).argmax(-1) == yva).float().mean().item()
        print(f"layer {l} {name} linear probe val acc {acc:.3f}")
