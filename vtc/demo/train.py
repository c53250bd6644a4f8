"""Reproducible training of the two demo VLMs (CPU friendly; uses CUDA when present).

Both follow the recipe of real LLaVA-style models, scaled down:

- **Stage 1, vision tower** (CLIP-style, CLS-based scene description): the CLIP ViT's pooled CLS token
  predicts, for each of the 9 grid cells, the shape, colour and size of the object there (or "none"). So
  the CLS token is a global summary whose attention picks out the object patches, as in CLIP.
- **Stage 2, VLM**: projector + language model (+ the tower at half the learning rate, which keeps its
  stage-1 CLS objective as an auxiliary loss, so the CLS token stays a scene summary) on the VQA task,
  with answer-only loss (prompt tokens are masked with -100). Every image comes with several
  question/answer turns (``USER: <image>\\n q ASSISTANT: a</s> USER: q ASSISTANT: a</s> ...``); the first turn
  is exactly the evaluation prompt, and the causal LM cannot see the later turns when answering it.
- The ordered 1D model is trained with **nested dropout**: for most sequences only a random prefix of
  its 32 latents is visible to the LM (the rest are masked out of attention; position ids either keep
  the original numbering or are renumbered, so both ways of truncating are in distribution).

Entry points: :func:`train_grid`, :func:`train_1d`, :func:`main` (``python eval/train_demo.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import ASSETS
from .build import (
    IMAGE_TOKEN_ID,
    build_grid_model,
    build_grid_processor,
    build_ordered_model,
    build_ordered_processor,
    build_tokenizer,
)
from .evaluate import evaluate
from .task import COLORS, GRID, SHAPES, blank_image, format_conversation, get_sample, scene_qas

__all__ = ["train_grid", "train_1d", "main", "DEFAULT_LOG_DIR"]

DEFAULT_LOG_DIR = Path(__file__).resolve().parents[2] / "eval" / "results" / "demo_training"

GRID_DEFAULTS = dict(stage1_steps=150, stage1_batch=32, stage2_steps=600, stage2_batch=12, turns=12, lr=1.5e-3)
ORDERED_DEFAULTS = dict(stage1_steps=150, stage1_batch=32, stage2_steps=700, stage2_batch=16, turns=12, lr=1.5e-3)


# ------------------------------------------------------------------------------------------- helpers
class _Logger:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w")
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        self.f.write(line + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def _pixel_values(processor, images, device):
    return processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)


def _scene_targets(scene) -> np.ndarray:
    """(9, 3) int targets per grid cell: shape (0 none, 1..4), colour (0, 1..6), size (0, 1 small, 2 large)."""
    t = np.zeros((GRID * GRID, 3), dtype=np.int64)
    colors = list(COLORS)
    for o in scene:
        c = o.row * GRID + o.col
        t[c] = (SHAPES.index(o.shape) + 1, colors.index(o.color) + 1, 1 if o.size == "small" else 2)
    return t


class _SceneHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.n = (len(SHAPES) + 1, len(COLORS) + 1, 3)
        self.proj = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, GRID * GRID * sum(self.n)))

    def loss(self, cls: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.proj(cls).view(cls.shape[0], GRID * GRID, sum(self.n))
        losses, accs, o = [], [], 0
        for k, n in enumerate(self.n):
            logits = out[..., o : o + n]
            losses.append(F.cross_entropy(logits.reshape(-1, n), targets[..., k].reshape(-1)))
            accs.append((logits.argmax(-1) == targets[..., k]).float().mean())
            o += n
        return sum(losses) / len(losses), sum(accs) / len(accs)


def pretrain_tower(clip_vision_model, processor, steps: int, batch: int, device, log, seed: int, desc: str):
    """Stage 1: CLS token (pooled, post-layernorm) -> per-cell shape / colour / size of the scene."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    head = _SceneHead(clip_vision_model.config.hidden_size).to(device)
    params = list(clip_vision_model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05, betas=(0.9, 0.98))
    clip_vision_model.train()
    idx = 10_000_000  # stage-1 images come from a separate range of the train split
    bar = tqdm(range(steps), desc=f"{desc} stage1 (tower)")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = 2e-3 * _lr_factor(step, steps, max(1, steps // 20))
        samples = [get_sample("train", idx + i) for i in range(batch)]
        idx += batch
        pv = _pixel_values(processor, [s.image for s in samples], device)
        tg = torch.from_numpy(np.stack([_scene_targets(s.scene) for s in samples])).to(device)
        cls = clip_vision_model(pv).pooler_output
        loss, acc = head.loss(cls, tg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.3f}")
        if step % 20 == 0 or step == steps - 1:
            log(f"stage1 step {step} loss {loss.item():.4f} cell_acc {acc.item():.4f}")
    return head


def stage1_tower(
    clip_vision_model, processor, hp: dict, device, log, seed: int, desc: str, cache_dir: Path, reuse: bool = False
):
    """Stage 1, shared by both models: their CLIP towers have the same config, init and data, so the result
    is identical. It is saved as ``cache_dir/stage1_s{steps}_b{batch}_seed{seed}.safetensors`` and, with
    ``reuse=True`` (``--model all`` does this for the 1D model), loaded instead of being recomputed."""
    from safetensors.torch import load_file, save_file

    head = _SceneHead(clip_vision_model.config.hidden_size).to(device)
    path = Path(cache_dir) / f"stage1_s{hp['stage1_steps']}_b{hp['stage1_batch']}_seed{seed}.safetensors"
    if reuse and path.exists():
        state = load_file(str(path), device=str(device))
        clip_vision_model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("tower.")})
        head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        log(f"stage1: loaded the shared stage-1 tower from {path}")
        return head
    head = pretrain_tower(clip_vision_model, processor, hp["stage1_steps"], hp["stage1_batch"], device, log, seed, desc)
    state = {f"tower.{k}": v.detach().cpu().contiguous() for k, v in clip_vision_model.state_dict().items()}
    state.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.rename(path)
    log(f"stage1: saved the tower to {path}")
    return head


def _vqa_batch(tokenizer, processor, start: int, batch: int, turns: int, device):
    """Images start..start+batch-1 of the train split, each with ``turns`` QA turns; answer-only labels."""
    texts, images, targets = [], [], []
    for i in range(start, start + batch):
        s = get_sample("train", i)
        targets.append(_scene_targets(s.scene))
        rng = np.random.default_rng([777, i])
        qas = [(s.question, s.answer)] + [(q, a) for q, a, _ in scene_qas(s.scene, rng, turns - 1)]
        texts.append(format_conversation(qas))
        images.append(s.image)
    tokenizer.padding_side = "right"
    enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
    ids, am = enc["input_ids"], enc["attention_mask"]
    ast, colon, eos = (tokenizer.convert_tokens_to_ids(t) for t in ("ASSISTANT", ":", "</s>"))
    labels = torch.full_like(ids, -100)
    ans = torch.zeros_like(ids, dtype=torch.bool)
    ans[:, 2:] = (ids[:, :-2] == ast) & (ids[:, 1:-1] == colon)
    labels[ans] = ids[ans]
    after = torch.zeros_like(ans)
    after[:, 1:] = ans[:, :-1] & (ids[:, 1:] == eos)
    labels[after] = eos
    tg = torch.from_numpy(np.stack(targets)).to(device)
    return ids.to(device), am.to(device), enc["pixel_values"].to(device), labels.to(device), tg


def _nested_dropout(ids, am, n_latents: int, rng: np.random.Generator, p_full: float):
    """Mask out a random tail of the latents per sequence; return (attention_mask, position_ids)."""
    am = am.clone()
    b = ids.shape[0]
    pos_keep = torch.arange(ids.shape[1], device=ids.device).expand(b, -1).clone()
    first = (ids == IMAGE_TOKEN_ID).float().argmax(1)
    for r in range(b):
        if rng.random() < p_full:
            continue
        k = int(rng.integers(1, n_latents))  # keep latents [0, k)
        f = int(first[r])
        am[r, f + k : f + n_latents] = 0
        if rng.random() < 0.5:  # renumbered positions (as if the dropped latents were removed)
            pos_keep[r] = torch.clamp(am[r].cumsum(0) - 1, min=0)
    return am, pos_keep


def _encode_grid(model, pv):
    """Exactly ``LlavaModel.get_image_features`` (layer -2, CLS dropped) plus the pooled CLS for the aux loss."""
    vt = model.model.vision_tower(pv, output_hidden_states=True)
    layer, strategy = model.config.vision_feature_layer, model.config.vision_feature_select_strategy
    hs = vt.hidden_states[layer]
    feats = model.model.multi_modal_projector(hs[:, 1:] if strategy == "default" else hs)
    return feats, vt.pooler_output


def _encode_ordered(model, pv):
    vt = model.model.vision_tower(pv)
    return model.model.multi_modal_projector(vt.last_hidden_state), vt.pooler_output


def _train_vlm(
    model,
    processor,
    tower_params,
    steps,
    batch,
    turns,
    lr,
    device,
    log,
    seed,
    desc,
    encode,
    head,
    out: Path,
    nested: int | None = None,
    eval_every: int = 100,
    tower_lr_mult: float = 0.5,
    aux_weight: float = 0.3,
):
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 12345])
    tok = processor.tokenizer
    tower_ids = {id(p) for p in tower_params}
    rest = [p for p in model.parameters() if id(p) not in tower_ids] + list(head.parameters())
    decay = lambda ps: [p for p in ps if p.ndim >= 2]  # noqa: E731
    no_decay = lambda ps: [p for p in ps if p.ndim < 2]  # noqa: E731
    groups = [
        {"params": decay(rest), "weight_decay": 0.05, "base": lr},
        {"params": no_decay(rest), "weight_decay": 0.0, "base": lr},
        {"params": decay(tower_params), "weight_decay": 0.05, "base": lr * tower_lr_mult},
        {"params": no_decay(tower_params), "weight_decay": 0.0, "base": lr * tower_lr_mult},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))
    all_params = [p for g in groups for p in g["params"]]
    bar = tqdm(range(steps), desc=f"{desc} stage2 (VLM)")
    ema = None
    for step in bar:
        model.train()
        f = _lr_factor(step, steps, max(1, steps // 20))
        for g in opt.param_groups:
            g["lr"] = g["base"] * f
        ids, am, pv, labels, tg = _vqa_batch(tok, processor, step * batch, batch, turns, device)
        pos = None
        if nested is not None:
            am, pos = _nested_dropout(ids, am, nested, rng, p_full=0.35)
        feats, cls = encode(model, pv)
        mm = {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
        res = model(input_ids=ids, attention_mask=am, position_ids=pos, mm_encoder_outputs=mm, labels=labels)
        aux, _ = head.loss(cls, tg)
        loss = res.loss + aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(all_params, 1.0)
        opt.step()
        li = res.loss.item()
        ema = li if ema is None else 0.95 * ema + 0.05 * li
        bar.set_postfix(loss=f"{ema:.3f}")
        if step % 20 == 0 or step == steps - 1:
            log(
                f"stage2 step {step} loss {li:.4f} ema {ema:.4f} aux {aux.item():.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e}"
            )
        if (step + 1) % eval_every == 0 and step + 1 < steps:
            r = evaluate(model, processor, split="val", n=150, batch_size=50, mode="first_token")
            log(f"stage2 step {step + 1} val_first_token_acc {r['accuracy']:.4f} per_type {json.dumps(r['per_type'])}")
            _save(model, processor, out, log)  # checkpoint (overwritten by the final model)
    model.eval()
    return model


def _final_metrics(model, processor, log, n_test: int, extra: dict) -> dict:
    t = time.time()
    test = evaluate(model, processor, split="test", n=n_test, batch_size=50, mode="generate", progress=True)
    blind = evaluate(
        model,
        processor,
        split="test",
        n=n_test,
        batch_size=50,
        mode="generate",
        image_transform=blank_image,
        progress=True,
    )
    val = evaluate(model, processor, split="val", n=n_test, batch_size=50, mode="first_token")
    metrics = {
        "test_accuracy": test["accuracy"],
        "test_per_type": test["per_type"],
        "blind_test_accuracy": blind["accuracy"],
        "blind_per_type": blind["per_type"],
        "val_accuracy_first_token": val["accuracy"],
        "n_test": n_test,
        **extra,
    }
    log(
        f"final test_acc {test['accuracy']:.4f} blind {blind['accuracy']:.4f} val {val['accuracy']:.4f} "
        f"per_type {json.dumps(test['per_type'])} (eval {time.time() - t:.0f}s)"
    )
    return metrics


def _save(model, processor, out: Path, log) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"saved to {out} ({size / 1e6:.1f} MB)")
    return size


def _setup(seed: int, device: str | None, threads: int = 2):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ----------------------------------------------------------------------------------------- public API
def train_grid(
    out: str | Path | None = None,
    log_dir: str | Path | None = None,
    seed: int = 0,
    device: str | None = None,
    n_test: int = 600,
    threads: int = 2,
    reuse_stage1: bool = False,
    **overrides,
) -> dict:
    """Train ``vtc-tiny-llava`` (stock LLaVA, CLIP tower with CLS) from scratch; save it; return metrics."""
    hp = {**GRID_DEFAULTS, **overrides}
    out = Path(out) if out else ASSETS / "tiny-llava"
    log_dir = Path(log_dir) if log_dir else DEFAULT_LOG_DIR
    dev = _setup(seed, device, threads)
    log = _Logger(log_dir / "grid.log")
    log(f"train grid model: {json.dumps(hp)} seed {seed} device {dev}")
    t0 = time.time()
    tok = build_tokenizer()
    model = build_grid_model(tok).to(dev)
    processor = build_grid_processor(tok)
    tower = model.model.vision_tower
    head = stage1_tower(tower, processor, hp, dev, log, seed, "grid", log_dir, reuse_stage1)
    t1 = time.time()
    _train_vlm(
        model,
        processor,
        list(tower.parameters()),
        hp["stage2_steps"],
        hp["stage2_batch"],
        hp["turns"],
        hp["lr"],
        dev,
        log,
        seed + 1,
        "grid",
        _encode_grid,
        head,
        out,
    )
    train_time = time.time() - t0
    log(f"training wall time {train_time:.0f}s (stage1 {t1 - t0:.0f}s)")
    size = _save(model.cpu(), processor, out, log)
    model.to(dev)
    metrics = _final_metrics(
        model,
        processor,
        log,
        n_test,
        {
            "model": "vtc-tiny-llava",
            "train_seconds": train_time,
            "stage1_seconds": t1 - t0,
            "bytes_on_disk": size,
            "params": sum(p.numel() for p in model.parameters()),
            "hparams": hp,
            "seed": seed,
            "device": str(dev),
        },
    )
    (log_dir / "grid.json").write_text(json.dumps(metrics, indent=2))
    log.close()
    return metrics


def train_1d(
    out: str | Path | None = None,
    log_dir: str | Path | None = None,
    seed: int = 0,
    device: str | None = None,
    n_test: int = 600,
    threads: int = 2,
    reuse_stage1: bool = False,
    **overrides,
) -> dict:
    """Train ``vtc-tiny-1d`` (32 ordered latents, nested dropout) from scratch; save it; return metrics."""
    hp = {**ORDERED_DEFAULTS, **overrides}
    out = Path(out) if out else ASSETS / "tiny-1d"
    log_dir = Path(log_dir) if log_dir else DEFAULT_LOG_DIR
    dev = _setup(seed, device, threads)
    log = _Logger(log_dir / "1d.log")
    log(f"train ordered 1D model: {json.dumps(hp)} seed {seed} device {dev}")
    t0 = time.time()
    tok = build_tokenizer()
    model = build_ordered_model(tok).to(dev)
    processor = build_ordered_processor(tok)
    clip = model.model.vision_tower.encoder
    head = stage1_tower(clip, processor, hp, dev, log, seed, "1d", log_dir, reuse_stage1)
    t1 = time.time()
    _train_vlm(
        model,
        processor,
        list(clip.parameters()),
        hp["stage2_steps"],
        hp["stage2_batch"],
        hp["turns"],
        hp["lr"],
        dev,
        log,
        seed + 1,
        "1d",
        _encode_ordered,
        head,
        out,
        nested=model.config.n_latents,
    )
    train_time = time.time() - t0
    log(f"training wall time {train_time:.0f}s (stage1 {t1 - t0:.0f}s)")
    size = _save(model.cpu(), processor, out, log)
    model.to(dev)
    metrics = _final_metrics(
        model,
        processor,
        log,
        n_test,
        {
            "model": "vtc-tiny-1d",
            "train_seconds": train_time,
            "stage1_seconds": t1 - t0,
            "bytes_on_disk": size,
            "params": sum(p.numel() for p in model.parameters()),
            "hparams": hp,
            "seed": seed,
            "device": str(dev),
        },
    )
    metrics["prefix_accuracy"] = _prefix_curve(model, processor, log)
    (log_dir / "1d.json").write_text(json.dumps(metrics, indent=2))
    log.close()
    return metrics


@torch.no_grad()
def _prefix_curve(model, processor, log, n: int = 150) -> dict:
    """Test accuracy when the LM sees only the first k latents (placeholders removed from the prompt)."""
    from .task import format_prompt, get_samples

    samples = get_samples("test", n)
    tok = processor.tokenizer
    tok.padding_side = "left"
    dev = next(model.parameters()).device
    res = {}
    for k in (1, 2, 4, 8, 16, 32):
        hits = 0
        for b in range(0, n, 50):
            chunk = samples[b : b + 50]
            inp = processor(
                images=[s.image for s in chunk],
                text=[format_prompt(s.question) for s in chunk],
                return_tensors="pt",
                padding=True,
            ).to(dev)
            feats = torch.stack(model.get_image_features(inp["pixel_values"]).pooler_output)[:, :k]
            ids, am = inp["input_ids"], inp["attention_mask"]
            keep = torch.ones_like(ids, dtype=torch.bool)
            img = ids == IMAGE_TOKEN_ID
            keep &= ~(img & (img.cumsum(1) > k))
            ids = torch.stack([ids[r][keep[r]] for r in range(ids.shape[0])])
            am = torch.stack([am[r][keep[r]] for r in range(am.shape[0])])
            emb = model.get_input_embeddings()(ids)
            emb = emb.masked_scatter((ids == IMAGE_TOKEN_ID).unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
            pred = model(inputs_embeds=emb, attention_mask=am).logits[:, -1].argmax(-1)
            words = tok.convert_ids_to_tokens(pred.tolist())
            hits += sum(w == s.answer for w, s in zip(words, chunk))
        res[k] = hits / n
    log(f"prefix accuracy (first-token, renumbered positions) {json.dumps(res)}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Retrain the demo VLMs from scratch (fixed seed).")
    ap.add_argument("--model", choices=["grid", "1d", "all"], default="all")
    ap.add_argument("--out", default=None, help="folder for the models (default: vtc/assets)")
    ap.add_argument("--log-dir", default=None, help="default: eval/results/demo_training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--stage1-steps", type=int, default=None)
    ap.add_argument("--stage2-steps", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument(
        "--reuse-stage1",
        action="store_true",
        help="load the saved stage-1 tower if present (always done for the 1D model under --model all)",
    )
    args = ap.parse_args(argv)
    root = Path(args.out) if args.out else ASSETS
    over = {}
    if args.stage1_steps is not None:
        over["stage1_steps"] = args.stage1_steps
    if args.stage2_steps is not None:
        over["stage2_steps"] = args.stage2_steps
    results = {}
    if args.model in ("grid", "all"):
        results["grid"] = train_grid(
            root / "tiny-llava",
            args.log_dir,
            args.seed,
            args.device,
            args.n_test,
            args.threads,
            args.reuse_stage1,
            **over,
        )
    if args.model in ("1d", "all"):
        results["1d"] = train_1d(
            root / "tiny-1d",
            args.log_dir,
            args.seed,
            args.device,
            args.n_test,
            args.threads,
            args.reuse_stage1 or args.model == "all",
            **over,
        )
    for name, m in results.items():
        print(
            f"{name}: test {m['test_accuracy']:.3f} blind {m['blind_test_accuracy']:.3f} "
            f"train {m['train_seconds'] / 60:.1f} min, {m['bytes_on_disk'] / 1e6:.1f} MB"
        )
    return 0
