"""Symbolic toy with packing: image = 9 cell tokens or 196 patch tokens (symbolic features), k QA branches per image."""
import sys, time, argparse, numpy as np, torch
sys.path.insert(0, "/work/main")
from vtc.demo.build import build_tokenizer, text_config
from vtc.demo import task as T
from transformers import LlamaForCausalLM
ap = argparse.ArgumentParser()
for k, v in dict(lr=1e-3, b2=0.98, wd=0.0, heads=4, layers=4, hidden=256, imgs=32, k=8, steps=1500, std=0.02,
                 warm=100, types="all", clip=1.0, threads=1, seed=0, patches=0, noise=0.0, bg0=0, bg1=0, real=0, ln=0, layer=-2, aux=0.0, tune=0, rowcol=0, wname='full', switch=0, types2='').items():
    ap.add_argument("--" + k, type=type(v), default=v)
A = ap.parse_args()
torch.set_num_threads(A.threads); torch.manual_seed(A.seed)
tok = build_tokenizer(); V = len(tok)
cfg = text_config(V); cfg._attn_implementation = "sdpa"
cfg.num_attention_heads = cfg.num_key_value_heads = A.heads; cfg.num_hidden_layers = A.layers
cfg.hidden_size = A.hidden; cfg.intermediate_size = 2 * A.hidden; cfg.initializer_range = A.std
lm = LlamaForCausalLM(cfg)
H = A.hidden; NI = 196 if A.patches else 9
cols, shapes = list(T.COLORS), list(T.SHAPES)
E = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.randn(n, H) * A.std) for k, n in
                            dict(c=len(cols), s=len(shapes), z=2, pos=NI, bg=1, row=14 if A.patches else 3, col=14 if A.patches else 3).items()})
extra = []
if A.real:
    from vtc.demo.build import build_grid_model, build_grid_processor
    from safetensors.torch import load_file
    gm = build_grid_model(tok); proc = build_grid_processor(tok)
    tower = gm.model.vision_tower
    st = load_file('/work/main/eval/results/demo_training/stage1_v3_s1200_b32_seed0.safetensors')
    tower.load_state_dict({k[6:]: v for k, v in st.items() if k.startswith('tower.')})
    tower.requires_grad_(False).eval()
    if A.tune: tower.requires_grad_(True)
    proj = torch.nn.Sequential(*( [torch.nn.LayerNorm(128)] if A.ln else []), torch.nn.Linear(128, H), torch.nn.GELU(), torch.nn.Linear(H, H))
    auxh = torch.nn.Linear(H, 6 + 4 + 2 + 1)
    extra = list(proj.parameters()) + list(auxh.parameters()) + (list(tower.parameters()) if A.tune else [])
opt = torch.optim.AdamW(extra + list(lm.parameters()) + list(E.parameters()), lr=A.lr, betas=(0.9, A.b2), weight_decay=A.wd)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / A.warm))
types = T.QTYPES if A.types == "all" else A.types.split(",")
rng = np.random.default_rng(A.seed)
ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
PRE = [tok.bos_token_id] + ids("USER :")
def qa_for(scene):
    for _ in range(50):
        qt = types[int(rng.integers(len(types)))]
        if qt == "where":
            o = scene[int(rng.integers(len(scene)))]
            if A.wname == "color":
                uq = [p for p in scene if [x.color for x in scene].count(p.color) == 1]
                o = uq[int(rng.integers(len(uq)))] if uq else o
                nm = f"{o.color} object" if uq else o.name
            else:
                nm = o.name
            if A.wname == "which":  # the wording of task.py's training-only "where" questions
                if rng.random() < 0.5:
                    return f"which column is the {nm} in ?", T.COLS[o.col], qt
                return f"which row is the {nm} in ?", T.ROWS[o.row], qt
            if rng.random() < 0.5:
                return f"what is the {nm} left ?", T.COLS[o.col], qt
            return f"what is the {nm} above ?", T.ROWS[o.row], qt
        tm = T.TEMPLATES[qt]; tm = tm[int(rng.integers(len(tm)))]
        cands = T._candidates(scene, tm, rng)
        if not cands: continue
        ans = sorted({a for _, a in cands}); a = ans[int(rng.integers(len(ans)))]
        qs = [q for q, aa in cands if aa == a]
        return qs[int(rng.integers(len(qs)))], a, qt
pc = (torch.arange(14) * 8 + 4).float()
def batch(n, step=10**9):
    cc = torch.full((n, NI), -1); cs = torch.zeros(n, NI, dtype=torch.long); cz = torch.zeros(n, NI, dtype=torch.long)
    branches, qts, ims = [], [], []
    for i in range(n):
        sc = T.random_scene(rng)
        if A.real: ims.append(T.render(sc, rng))
        for o in sc:
            if A.patches:
                r = (pc - o.cy).abs() <= o.px / 2; c = (pc - o.cx).abs() <= o.px / 2
                m = (r[:, None] & c[None, :]).flatten()
                if not m.any(): m[int(o.cy // 8) * 14 + int(o.cx // 8)] = True
            else:
                m = torch.zeros(9, dtype=torch.bool); m[o.row * 3 + o.col] = True
            cc[i, m] = cols.index(o.color); cs[i, m] = shapes.index(o.shape); cz[i, m] = int(o.size == "large")
        br = []
        for _ in range(A.k):
            q, a, qt = qa_for(sc); br.append((ids(" " + q + " ASSISTANT :"), ids(a)[0])); qts.append(qt)
        branches.append(br)
    occ = (cc >= 0).unsqueeze(-1)
    side = 14 if A.patches else 3
    posemb = (E["row"][:, None] + E["col"][None, :]).flatten(0, 1) if A.rowcol else E["pos"]
    img = torch.where(occ, E["c"][cc.clamp(min=0)] + E["s"][cs] + E["z"][cz], E["bg"][0]) + posemb
    if A.real:
        pv = proc.image_processor(ims, return_tensors='pt')['pixel_values']
        with torch.set_grad_enabled(bool(A.tune)):
            hs = tower(pv, output_hidden_states=True).hidden_states[A.layer][:, 1:]
        img = proj(hs)
        global AUXL
        lg_ = auxh(img); occ_ = cc >= 0
        AUXL = torch.nn.functional.cross_entropy(lg_[..., :6][occ_], cc[occ_]) + torch.nn.functional.cross_entropy(lg_[..., 6:10][occ_], cs[occ_]) + torch.nn.functional.cross_entropy(lg_[..., 10:12][occ_], cz[occ_]) + torch.nn.functional.binary_cross_entropy_with_logits(lg_[..., 12], occ_.float())
    if A.noise: img = img + A.noise * A.std * torch.randn_like(img)
    P = len(PRE) + NI
    L = P + max(sum(len(q) for q, _ in br) for br in branches)
    tokids = torch.zeros(n, L, dtype=torch.long); isimg = torch.zeros(n, L, dtype=torch.bool); isimg[:, len(PRE):P] = True
    tokids[:, :len(PRE)] = torch.tensor(PRE)
    seg = torch.full((n, L), -2); seg[:, :P] = -1  # -1 prefix, b>=0 branch, -2 pad
    pos = torch.zeros(n, L, dtype=torch.long); pos[:, :P] = torch.arange(P)
    tgt_pos, tgt = [], []
    for i, br in enumerate(branches):
        t = P
        for b, (q, a) in enumerate(br):
            tokids[i, t:t + len(q)] = torch.tensor(q); seg[i, t:t + len(q)] = b; pos[i, t:t + len(q)] = torch.arange(P, P + len(q))
            tgt_pos.append((i, t + len(q) - 1)); tgt.append(a); t += len(q)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    sq, sk = seg[:, :, None], seg[:, None, :]
    mask = causal & ((sk == -1) | (sq == sk)) & (sq != -2)
    if A.bg1:
        frac = min(1.0, max(0.0, (step - A.bg0) / max(1, A.bg1 - A.bg0)))
        drop = (cc < 0) & (torch.rand(n, NI) >= frac)
        kd = torch.zeros(n, L, dtype=torch.bool); kd[:, len(PRE):P] = drop
        mask = mask & ~kd[:, None, :]
    mask = mask | torch.eye(L, dtype=torch.bool)  # pads see themselves
    emb = lm.get_input_embeddings()(tokids)
    emb = torch.where(isimg.unsqueeze(-1), torch.cat([torch.zeros(n, len(PRE), H), img, torch.zeros(n, L - P, H)], 1), emb)
    return emb, mask[:, None], pos, torch.tensor(tgt_pos), torch.tensor(tgt), qts
t0 = time.time(); hist = []
for step in range(A.steps + 1):
    if A.switch and step == A.switch: types = A.types2.split(',')
    x, m, pos, tp, tgt, qts = batch(A.imgs, step)
    h = lm.model(inputs_embeds=x, attention_mask=m, position_ids=pos).last_hidden_state
    logits = lm.lm_head(h[tp[:, 0], tp[:, 1]])
    loss = torch.nn.functional.cross_entropy(logits, tgt)
    if A.real and A.aux: loss = loss + A.aux * AUXL
    opt.zero_grad(); loss.backward()
    if A.clip: torch.nn.utils.clip_grad_norm_(lm.parameters(), A.clip)
    opt.step(); sched.step()
    ok = (logits.argmax(-1) == tgt)
    hist.append(ok.float())
    if step % 50 == 0:
        acc = torch.cat(hist).mean().item(); hist = []
        per = {}
        for t_, o_ in zip(qts, ok.tolist()): per.setdefault(t_, []).append(o_)
        print(step, round(loss.item(), 3), round(acc, 3), {k: round(float(np.mean(v)), 2) for k, v in sorted(per.items())}, round(time.time() - t0), flush=True)
