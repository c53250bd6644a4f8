import sys, torch, numpy as np, time
sys.path.insert(0, "/work/main")
from vtc.demo.build import build_tokenizer, text_config
from vtc.demo.task import COLORS, SHAPES
from transformers import LlamaForCausalLM
import argparse
ap = argparse.ArgumentParser(); ap.add_argument("--lr", type=float, default=1e-3); ap.add_argument("--b2", type=float, default=0.98)
ap.add_argument("--wd", type=float, default=0.05); ap.add_argument("--heads", type=int, default=4); ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--batch", type=int, default=64); ap.add_argument("--clip", type=float, default=1.0); ap.add_argument("--steps", type=int, default=900)
ap.add_argument("--std", type=float, default=0.02)
A = ap.parse_args()
torch.set_num_threads(1); torch.manual_seed(0)
tok = build_tokenizer()
cfg = text_config(len(tok)); cfg._attn_implementation = "sdpa"
cfg.num_attention_heads = cfg.num_key_value_heads = A.heads; cfg.num_hidden_layers = A.layers; cfg.initializer_range = A.std
lm = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(lm.parameters(), lr=A.lr, betas=(0.9, A.b2), weight_decay=A.wd)
C, S = list(COLORS), list(SHAPES)
rng = np.random.default_rng(0)
def batch(n=None):
    n = n or A.batch
    texts = []
    for _ in range(n):
        k = rng.integers(3, 7)
        pairs = rng.choice(24, size=k, replace=False)
        objs = [(C[p % 6], S[p // 6]) for p in pairs]
        # unique colour for the question
        cs = [c for c, _ in objs]
        uniq = [o for o in objs if cs.count(o[0]) == 1]
        if not uniq: continue
        c, s = uniq[rng.integers(len(uniq))]
        texts.append((" ".join(f"{a} {b}" for a, b in objs) + f" what shape is the {c} object ? ASSISTANT :", s))
    enc = [tok(t)["input_ids"] + tok(a, add_special_tokens=False)["input_ids"] for t, a in texts]
    L = max(map(len, enc))
    ids = torch.tensor([[0] * (L - len(e)) + e for e in enc]); am = (ids != 0).long()
    lab = torch.full_like(ids, -100); lab[:, -1] = ids[:, -1]
    return ids, am, lab
t0 = time.time()
for step in range(A.steps):
    ids, am, lab = batch()
    out = lm(input_ids=ids, attention_mask=am, labels=lab)
    opt.zero_grad(); out.loss.backward(); A.clip and torch.nn.utils.clip_grad_norm_(lm.parameters(), A.clip); opt.step()
    if step % 100 == 0:
        with torch.no_grad():
            acc = (out.logits[:, -2].argmax(-1) == ids[:, -1]).float().mean().item()
        print(step, round(out.loss.item(), 3), acc, round(time.time() - t0), flush=True)
