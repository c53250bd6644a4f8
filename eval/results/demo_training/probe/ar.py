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
ap.add_argument("--dense", type=int, default=0)
A = ap.parse_args()
torch.set_num_threads(2); torch.manual_seed(0)
tok = build_tokenizer()
cfg = text_config(len(tok)); cfg._attn_implementation = "sdpa"
cfg.num_attention_heads = cfg.num_key_value_heads = A.heads; cfg.num_hidden_layers = A.layers; cfg.initializer_range = A.std
lm = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(lm.parameters(), lr=A.lr, betas=(0.9, A.b2), weight_decay=A.wd)
C, S = list(COLORS), list(SHAPES)
rng = np.random.default_rng(0)
def batch(n=None):
    n = n or A.batch
    seqs, labs = [], []
    for _ in range(n):
        k = rng.integers(3, 7)
        pairs = rng.choice(24, size=k, replace=False)
        objs = [(C[p % 6], S[p // 6]) for p in pairs]
        cs = [c for c, _ in objs]
        uniq = [o for o in objs if cs.count(o[0]) == 1]
        if not uniq: continue
        ids = tok(" ".join(f"{a} {b}" for a, b in objs))["input_ids"]; lab = [-100] * len(ids)
        qs = [uniq[i] for i in rng.permutation(len(uniq))][: (len(uniq) if A.dense else 1)]
        for c, sh in qs:
            q = tok(f" what shape is the {c} object ? ASSISTANT :", add_special_tokens=False)["input_ids"]
            a = tok(sh, add_special_tokens=False)["input_ids"]
            ids += q + a; lab += [-100] * len(q) + a
        seqs.append(ids); labs.append(lab)
    L = max(map(len, seqs))
    ids = torch.tensor([[0] * (L - len(e)) + e for e in seqs]); am = (ids != 0).long()
    lab = torch.tensor([[-100] * (L - len(e)) + e for e in labs])
    return ids, am, lab
t0 = time.time()
for step in range(A.steps):
    ids, am, lab = batch()
    out = lm(input_ids=ids, attention_mask=am, labels=lab)
    opt.zero_grad(); out.loss.backward(); A.clip and torch.nn.utils.clip_grad_norm_(lm.parameters(), A.clip); opt.step()
    if step % 100 == 0:
        with torch.no_grad():
            m = lab[:, 1:] >= 0; acc = (out.logits[:, :-1].argmax(-1)[m] == lab[:, 1:][m]).float().mean().item()
        print(step, round(out.loss.item(), 3), acc, round(time.time() - t0), flush=True)
