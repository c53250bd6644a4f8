import sys, torch
sys.argv = ["exp.py", "--steps", "0", "--batch", "2", "--k", "3", "--bgkeep", "1.0"]
exec(open("exp.py").read())
from vtc.demo.task import format_prompt
model.eval()
ids, mask, pos, lab, pv, pc, keeps, _ = batch(5)
with torch.no_grad():
    f = encode(pv)
    mm = {"image": BaseModelOutputWithPooling(pooler_output=[x[k] for x, k in zip(f, keeps)])}
    lg = model(input_ids=ids, attention_mask=mask, position_ids=pos, mm_encoder_outputs=mm).logits
    first = (lab[:, 1:] >= 0) & (lab[:, :-1] < 0)
    b, t = torch.nonzero(first, as_tuple=True)
    packed = lg[:, :-1][b, t]
    # single-turn reference for sample 0's branches
    from vtc.demo.task import get_sample, scene_qas
    import numpy as np
    s = get_sample("train", 5 * 2 + 0)
    qas = [(s.question, s.answer)] + [(q, x) for q, x, _ in scene_qas(s.scene, np.random.default_rng([777, 10]), 2)]
    for j, (q, x) in enumerate(qas):
        enc = proc(images=[s.image], text=[format_prompt(q)], return_tensors="pt")
        ref = model(input_ids=enc["input_ids"], mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[f[0]])}).logits[0, -1]
        print(j, q, x, (ref - packed[j]).abs().max().item())
