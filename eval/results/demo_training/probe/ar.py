import sys, torch, numpy as np, time
sys.path.insert(0, "/work/main")
from vtc.demo.build import build_tokenizer, text_config
from vtc.demo.task import COLORS, SHAPES
from transformers import LlamaForCausalLM
torch.set_num_threads(2); torch.manual_seed(0)
tok = build_tokenizer()
cfg = text_config(len(tok)); cfg._attn_implementation = "sdpa"
lm = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(lm.parameters(), lr=float(sys.argv[1]) if len(sys.argv) > 1 else 1e-3, betas=(0.9, 0.98), weight_decay=0.05)
C, S = list(COLORS), list(SHAPES)
rng = np.random.default_rng(0)
def batch(n=64):
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
for step in range(1500):
    ids, am, lab = batch()
    out = lm(input_ids=ids, attention_mask=am, labels=lab)
    opt.zero_grad(); out.loss.backward(); torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0); opt.step()
    if step % 100 == 0:
        with torch.no_grad():
            acc = (out.logits[:, -2].argmax(-1) == ids[:, -1]).float().mean().item()
        print(step, round(out.loss.item(), 3), acc, round(time.time() - t0), flush=True)
