import sys, time, json, math, argparse
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, "/work/main")
from vtc.demo.build import build_tokenizer, build_grid_model, build_grid_processor, IMAGE_TOKEN_ID
from vtc.demo.train import stage1_tower, _Logger, _lr_factor, DEFAULT_LOG_DIR, GRID_DEFAULTS
from vtc.demo.task import get_sample, scene_qas
from vtc.demo.evaluate import evaluate
from transformers.modeling_outputs import BaseModelOutputWithPooling

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--k", type=int, default=8)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--eval-every", type=int, default=50)
ap.add_argument("--tag", default="e")
ap.add_argument("--scale", type=float, default=0)  # target rms of projected feats (0: none)
ap.add_argument("--freeze", type=int, default=1)
ap.add_argument("--symbolic", type=int, default=0)
ap.add_argument("--types", default="")
ap.add_argument("--onlytype", type=int, default=-1)
ap.add_argument("--centre", type=int, default=0)
ap.add_argument("--valkeep", type=int, default=0)
ap.add_argument("--hop1", type=float, default=0)
ap.add_argument("--trivial", type=int, default=0)
ap.add_argument("--qfirst", type=int, default=0)
ap.add_argument("--attn", type=float, default=0)
ap.add_argument("--attn-layers", default="1,2")
ap.add_argument("--bgkeep", type=float, default=1.0)
ap.add_argument("--symstd", type=float, default=1.0)
ap.add_argument("--embstd", type=float, default=0)
ap.add_argument("--layer", type=int, default=-2)
a = ap.parse_args()
torch.set_num_threads(2); torch.manual_seed(1)
log = _Logger(__import__("pathlib").Path(f"/tmp/exp/{a.tag}.log"))
tok = build_tokenizer(); model = build_grid_model(tok); proc = build_grid_processor(tok)
tower = model.model.vision_tower
stage1_tower(tower, proc, GRID_DEFAULTS, torch.device("cpu"), log, 0, "grid", DEFAULT_LOG_DIR, True)
if a.freeze:
    for p in tower.parameters(): p.requires_grad_(False)
ids_of = lambda s: tok(s, add_special_tokens=False)["input_ids"]
PREFIX = [tok.bos_token_id] + ids_of("USER:") + [IMAGE_TOKEN_ID] * 196
P = len(PREFIX)
def batch(step, split='train'):
    seqs, segs, labs, poss, imgs, keeps = [], [], [], [], [], []
    targets = []
    hop1 = []
    from vtc.demo.task import COLORS, SHAPES, PLURAL, ROWS, COLS
    from vtc.demo.train import _tower_targets
    for b in range(a.batch):
        i = step * a.batch + b
        if a.onlytype >= 0: i = i * 6 + a.onlytype
        s = get_sample(split, i)
        pc = _tower_targets([s.scene])[1][0]
        keep = (pc > 0) | (torch.rand(196, generator=torch.Generator().manual_seed(i)) < a.bgkeep)
        if a.centre:
            keep = torch.rand(196, generator=torch.Generator().manual_seed(i)) < a.bgkeep
            for o in s.scene:
                keep[int(o.cy // 8) * 14 + int(o.cx // 8)] = True
        keeps.append(keep)
        nk = int(keep.sum())
        PREFIX = [tok.bos_token_id] + ids_of("USER:") + [IMAGE_TOKEN_ID] * nk
        P = len(PREFIX)
        prefpos = [0, 1, 2] + (3 + torch.nonzero(keep)[:, 0]).tolist()
        qas = [(s.question, s.answer, s.qtype)] + scene_qas(s.scene, np.random.default_rng([777, i]), 4 * a.k if a.types else a.k - 1)
        if a.types: qas = [x for x in qas if x[2] in a.types.split(",")][: a.k]
        qas = [(q, x) for q, x, _ in qas]
        from relevance import relevant
        from vtc.demo.train import _pair
        relmask = []
        for q, x in qas:
            pairs = {1 + _pair(o) for o in relevant(q, s.scene)}
            relmask.append(torch.tensor([int(c) in pairs for c in pc]))
        ids, seg, lab, pos = list(PREFIX), [0] * P, [-100] * P, list(prefpos)
        for j, (q, x) in enumerate(qas):
            qi = ids_of(f"{q} ASSISTANT:"); ai = ids_of(f"{x}</s>")
            if a.qfirst:
                assert a.k == 1
                qi = ids_of(q) + [IMAGE_TOKEN_ID] * nk + ids_of("ASSISTANT:")
                ids, seg, lab, pos = PREFIX[:3], [0] * 3, [-100] * 3, [0, 1, 2]
                nq = len(ids_of(q))
                ids += qi + ai; seg += [1] * (len(qi) + len(ai)); lab += [-100] * len(qi) + ai
                pos += list(range(3, 3 + nq)) + [3 + nq + int(p) - 3 for p in prefpos[3:]] + list(range(3 + nq + 196, 3 + nq + 196 + 2 + len(ai)))
                targets.append((b, len(ids) - len(ai) - 1, relmask[j][keep]))
                break
            ids += qi + ai; seg += [j + 1] * (len(qi) + len(ai)); lab += [-100] * len(qi) + ai
            targets.append((b, len(ids) - len(ai) - 1, relmask[j][keep]))
            CW = set(COLORS) | set(SHAPES) | set(PLURAL.values()) | {"small", "large"} | set(ROWS) | set(COLS)
            qwords = q.split()
            qstart = len(ids) - len(ai) - len(qi)
            hop1.append((b, len(ids) - len(ai) - 1, [qstart + t for t, w in enumerate(qwords) if w in CW]))
            pos += list(range(199, 199 + len(qi) + len(ai)))
        seqs.append(ids); segs.append(seg); labs.append(lab); poss.append(pos); imgs.append(s.image)
    L = max(map(len, seqs))
    pad = lambda xs, v: torch.tensor([x + [v] * (L - len(x)) for x in xs])
    ids, seg, lab, pos = pad(seqs, tok.pad_token_id), pad(segs, -1), pad(labs, -100), pad(poss, 0)
    q = torch.arange(L)
    causal = q[None, :, None] >= q[None, None, :]
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
    valid = (seg[:, None, :] >= 0)
    mask = (causal & same & valid)
    mask = mask | torch.eye(L, dtype=torch.bool)[None]  # pads attend to themselves
    pv = proc.image_processor(imgs, return_tensors="pt")["pixel_values"]
    from vtc.demo.train import _tower_targets
    return ids, mask[:, None], pos, lab, pv, _tower_targets([get_sample(split, (step*a.batch+b) * (6 if a.onlytype >= 0 else 1) + max(a.onlytype, 0)).scene for b in range(a.batch)])[1], keeps, (targets, hop1)
def encode(pv):
    with torch.set_grad_enabled(not a.freeze):
        hs = tower(pv, output_hidden_states=True).hidden_states[a.layer][:, 1:]
    f = model.model.multi_modal_projector(hs)
    if a.scale:
        f = f * (a.scale / f.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6))
    return f
sym = torch.nn.Embedding(25, 256)
torch.nn.init.normal_(sym.weight, std=a.symstd)
if a.embstd: torch.nn.init.normal_(model.get_input_embeddings().weight, std=a.embstd)
if a.symbolic: model.sym = sym
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
                         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.98))
log(json.dumps(vars(a)))
t0 = time.time(); ema = None
for step in range(a.steps):
    model.train()
    if a.attn or a.hop1: model.set_attn_implementation('eager')
    for g in opt.param_groups: g["lr"] = a.lr * _lr_factor(step, a.steps, 20)
    ids, mask, pos, lab, pv, pc, keeps, (targets, hop1) = batch(step)
    f = sym(pc) if a.symbolic else encode(pv)
    if a.trivial:  # every image token names the first object's pair
        ans = torch.tensor([int(lab[b][lab[b] >= 0][0]) if (lab[b] >= 0).any() else 0 for b in range(lab.shape[0])])
        f = sym(ans % 25)[:, None].expand(-1, 196, -1)
    mm = {"image": BaseModelOutputWithPooling(pooler_output=[x[k] for x, k in zip(f, keeps)])}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, mm_encoder_outputs=mm, labels=lab, output_attentions=bool(a.attn or a.hop1))
    aloss = torch.zeros(())
    if a.attn:
        rows = [(b, t, m) for b, t, m in targets if m.any()]
        bi = torch.tensor([r[0] for r in rows]); ti = torch.tensor([r[1] for r in rows])
        for l in map(int, a.attn_layers.split(",")):
            att = out.attentions[l][bi, 0, ti, 3:]  # head 0, query = ':' before the answer, keys from image start
            mass = torch.stack([att[i, : len(m)][m].sum() for i, (_, _, m) in enumerate(rows)])
            aloss = aloss - torch.log(mass + 1e-4).mean()
        aloss = aloss / len(a.attn_layers.split(","))
    h1 = torch.zeros(())
    if a.hop1:
        rows = [(b, t, c) for b, t, c in hop1 if c]
        att = out.attentions[0][torch.tensor([r[0] for r in rows]), 0, torch.tensor([r[1] for r in rows])]
        mass = torch.stack([att[i, c].sum() for i, (_, _, c) in enumerate(rows)])
        h1 = -torch.log(mass + 1e-4).mean()
    loss = out.loss + a.attn * aloss + a.hop1 * h1
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    ema = out.loss.item() if ema is None else .95 * ema + .05 * out.loss.item()
    if step % 10 == 0:
        log(f"step {step} h1 {h1.item():.3f} aloss {aloss.item():.3f} loss {out.loss.item():.3f} ema {ema:.3f} featrms {f.pow(2).mean().sqrt().item():.2f} {(time.time()-t0)/(step+1):.2f}s/step")
    if (step + 1) % a.eval_every == 0:
        if a.scale:
            model.model.multi_modal_projector._vtc_scale = a.scale
        model.set_attn_implementation('sdpa')
        if a.valkeep:
            model.eval(); hits = tot = 0
            with torch.no_grad():
                for vs in range(4):
                    ids, mask, pos, lab, pv, pc, keeps, _ = batch(vs, 'val')
                    f = sym(pc) if a.symbolic else encode(pv)
                    mm = {"image": BaseModelOutputWithPooling(pooler_output=[x[k] for x, k in zip(f, keeps)])}
                    lg = model(input_ids=ids, attention_mask=mask, position_ids=pos, mm_encoder_outputs=mm).logits
                    first = (lab[:, 1:] >= 0) & (lab[:, :-1] < 0)  # first answer token of every branch
                    pred = lg[:, :-1].argmax(-1)
                    hits += (pred[first] == lab[:, 1:][first]).sum().item(); tot += first.sum().item()
            log(f"step {step+1} VALKEEP {hits/tot:.3f} (n={tot})")
        r = {'accuracy': 0, 'per_type': {}} if a.symbolic else evaluate(model, proc, split="val", n=300, batch_size=50, mode="first_token")
        log(f"step {step+1} VAL {r['accuracy']:.3f} {json.dumps(r['per_type'])}")
