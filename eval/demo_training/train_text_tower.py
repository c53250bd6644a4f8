"""A CLIP text tower for the grid demo model, so that CDPruner's accuracy can be measured on it.

CDPruner (Zhang et al., NeurIPS 2025) scores every patch by the cosine between its CLIP-space embedding
``visual_projection(post_layernorm(h))`` and the instruction's CLIP text embedding. Real LLaVA-1.5 gets both from
the CLIP ViT-L/14-336 checkpoint its tower was cut from; the demo model's tower was trained from scratch and has no
text side. This script gives it one, the way CLIP aligns its towers, but at the patch level the method reads:

- the vision side is the demo model's own tower (frozen: the patch states h are exactly what vtc hands CDPruner);
  only its ``post_layernorm`` and a new ``visual_projection`` train;
- a small CLIP text transformer (word-level tokenizer over the task's vocabulary) embeds the question;
- loss: binary cross-entropy of ``scale * cos(z_i, t) + bias`` against "patch i overlaps an object the question
  names" (the objects whose colour or shape word is in the question, both where it names one object by both,
  the object of the named cell for position questions). So relevance has the *paper's* sign: configs that use
  this tower set ``negate: false`` (the official code negates the cosine because of how CLIP ViT-L's patch
  embeddings sit against its text embeddings; a tower trained like this one has no such flip).

Run from a checkout (about 5 minutes on 2 CPU cores)::

    python -m eval.demo_training.train_text_tower --out vtc/assets/tiny-llava-clip

The result is a ``CLIPModel`` checkpoint with its tokenizer, loadable by ``cdpruner``'s ``text_encoder`` field.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPECIAL = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}


def text_tokenizer():
    """Word-level tokenizer over the task's words; ``<s> ... </s>`` around every text (CLIP pools at ``</s>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from vtc.demo.task import vocabulary

    vocab = dict(SPECIAL) | {w: len(SPECIAL) + i for i, w in enumerate(vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation("isolated")])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def named_objects(question: str, scene) -> list:
    """The objects of ``scene`` a question is about (see the module docstring)."""
    from vtc.demo.task import COLS, PLURAL, ROWS

    words = set(re.findall(r"[a-z]+", question.lower()))
    for r, row in enumerate(ROWS):
        for c, col in enumerate(COLS):
            if f"{row} {col}" in question:
                return [o for o in scene if (o.row, o.col) == (r, c)]
    plural = {p: s for s, p in PLURAL.items()}
    shapes = {plural.get(w, w) for w in words}
    both = [o for o in scene if o.color in words and o.shape in shapes]
    if both:
        return both
    return [o for o in scene if o.color in words or o.shape in shapes]


def patch_mask(objs, image_size: int, patch: int) -> np.ndarray:
    """(g*g,) float: 1 where a patch overlaps one of ``objs``' boxes."""
    g = image_size // patch
    m = np.zeros((g, g), dtype=np.float32)
    for o in objs:
        half = o.px / 2
        c0, c1 = int((o.cx - half) // patch), int(min(image_size - 1, o.cx + half) // patch)
        r0, r1 = int((o.cy - half) // patch), int(min(image_size - 1, o.cy + half) // patch)
        m[max(r0, 0):r1 + 1, max(c0, 0):c1 + 1] = 1.0
    return m.reshape(-1)


def build_clip(demo, tok, seed: int):
    """CLIPModel whose vision tower is the demo model's (weights copied) and whose text tower is new."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vcfg = demo.config.vision_config.to_dict()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        vision_config=vcfg, projection_dim=64)
    clip = CLIPModel(cfg)
    clip.vision_model.load_state_dict(demo.model.vision_tower.state_dict(), strict=True)  # raises on any mismatch
    return clip


def dataset(demo, processor, tok, split: str, n: int, chunk: int = 64):
    """Patch states h of the demo tower's feature layer (computed once: the tower is frozen), question ids and
    attention masks, and the named-object patch masks of the first ``n`` samples of ``split``."""
    from vtc.demo.task import get_sample

    vc = demo.config.vision_config
    layer = demo.config.vision_feature_layer
    states, masks, questions = [], [], []
    for start in range(0, n, chunk):
        samples = [get_sample(split, i) for i in range(start, min(n, start + chunk))]
        pix = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hs = demo.model.vision_tower(pix, output_hidden_states=True).hidden_states[layer]
        states.append(hs[:, 1:])  # the "default" select strategy drops CLS, as vtc hands CDPruner
        masks += [patch_mask(named_objects(s.question, s.scene), vc.image_size, vc.patch_size) for s in samples]
        questions += [s.question for s in samples]
    enc = tok(questions, padding=True, return_tensors="pt")
    return torch.cat(states), enc["input_ids"], enc["attention_mask"], torch.from_numpy(np.stack(masks))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="vtc/assets/tiny-llava-clip")
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from vtc.demo import load

    demo, processor = load("grid")
    demo.eval().requires_grad_(False)
    tok = text_tokenizer()
    clip = build_clip(demo, tok, args.seed)
    clip.vision_model.requires_grad_(False)
    clip.vision_model.post_layernorm.requires_grad_(True)
    scale = torch.nn.Parameter(torch.tensor(10.0))
    bias = torch.nn.Parameter(torch.tensor(-5.0))
    params = [q for q in clip.parameters() if q.requires_grad] + [scale, bias]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    t0 = time.time()
    train = dataset(demo, processor, tok, "train", args.samples)
    val = dataset(demo, processor, tok, "val", 400)
    print(f"features of {args.samples} + 400 samples ({time.time() - t0:.0f} s)", flush=True)

    def logits(h, ids, att):
        z = clip.visual_projection(clip.vision_model.post_layernorm(h))
        t = clip.text_projection(clip.text_model(input_ids=ids, attention_mask=att).pooler_output)
        cos = torch.einsum("bnd,bd->bn", F.normalize(z, dim=-1), F.normalize(t, dim=-1))
        return scale * cos + bias

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(args.samples, generator=gen) for _ in range(
        args.steps * args.batch // args.samples + 1)])
    for step in range(args.steps):
        idx = order[step * args.batch:(step + 1) * args.batch]
        h, ids, att, mask = (x[idx] for x in train)
        lg = logits(h, ids, att)
        pos = mask.sum().clamp(min=1)
        loss = F.binary_cross_entropy_with_logits(lg, mask, pos_weight=((mask.numel() - pos) / pos))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)

    # held-out check: how often the most relevant patch lies on a named object, and the ranking quality
    with torch.no_grad():
        h, ids, att, mask = val
        lg = logits(h, ids, att)
        top1 = mask.gather(1, lg.argmax(1, keepdim=True)).mean().item()
        has = mask.sum(1) > 0
        rank = lg.argsort(1, descending=True).argsort(1)  # 0 = most relevant
        k = mask.sum(1, keepdim=True).clamp(min=1)
        precision = ((rank < k) * mask).sum(1)[has].div(k[has, 0]).mean().item()
    out = Path(args.out)
    clip.save_pretrained(out)
    tok.save_pretrained(out)
    record = {"samples": args.samples, "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
              "val_top1_on_named_object": round(top1, 4), "val_precision_at_k": round(precision, 4),
              "seconds": round(time.time() - t0)}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
