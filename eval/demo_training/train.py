"""Reproducible training of the two demo VLMs (CPU friendly; uses CUDA when present).

Both follow the recipe of real LLaVA-style models, scaled down:

- **Stage 1, vision tower** (CLIP-style, CLS-based scene description): the CLIP ViT's pooled CLS token names
  the objects of the scene (multi-label over colour-shape pairs, a bag-of-objects caption), so the CLS token
  is a global summary whose attention picks out the object patches, as in CLIP; dense per-patch objectives
  (which object is under each patch, and where the patch is) make the patch features carry colour, shape and
  position. Stages 1 and 2a are cached (``--reuse-stage1``, ``--reuse-lm``) under names that encode their
  hyperparameters; a run that loads them continues exactly like the run that computed them.
- **Stage 2a, language model pretraining** (grid model; real LLaVA starts from a pretrained LM): the LM learns
  the task on a symbolic copy of each image (:class:`SymbolicPatches`: each patch is the sum of learned
  colour / shape / size embeddings of the object under it, plus its row and column). A small LM trained from
  scratch on pixels sits on the blind plateau; with clean tokens it learns content-based retrieval.
  Background patches are hidden at first and shown with a probability rising to 1 (a curriculum: retrieval
  over 196 mostly empty patches gives almost no gradient at the start).
- **Stage 2b, feature alignment** (LLaVA's first stage; only the projector trains): each projected patch
  regresses onto the LM's symbolic copy of that patch, so image tokens arrive in the space the LM reads.
- **Stage 2c, visual instruction tuning** (LLaVA-1.5, with the tower unfrozen at a tenth of the learning rate as
  later LLaVA recipes do): the projector, the LM and the tower (and the 1D model's resampler) learn the VQA task
  from real pixels, answer-only loss. Each image carries several
  QA branches packed behind one copy of the image prefix (:func:`packed_sequences`); a block mask and
  restarted position ids make every branch exactly the single-turn evaluation prompt, so no answer can be read
  off another question's text and the image is encoded once for many supervised answers.
- The ordered 1D model starts from the grid model's CLIP tower and LM. Its resampler and projector are first
  aligned (:func:`align_latents`): latent ``j < 9`` regresses onto the grid model's image tokens of scene cell
  ``j``, so the LM can read the latents from the start; a bridge stage trains them on the VQA task with the LM
  frozen. Then everything trains with **nested dropout**: for most images
  only a random prefix of its 32 latents is visible to the LM (the rest are masked out of attention; position
  ids either keep the original numbering or are renumbered, so both ways of truncating are in distribution).

Entry points: :func:`train_grid`, :func:`train_1d`, :func:`main` (``python eval/train_demo.py``). Research code,
run from a checkout; not part of the installed package (the demo models, their task and loader are ``vtc.demo``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vtc.demo import ASSETS
from vtc.demo.build import (
    IMAGE_TOKEN_ID,
    PATCH,
    build_grid_model,
    build_grid_processor,
    build_ordered_model,
    build_ordered_processor,
    build_tokenizer,
)
from vtc.demo.evaluate import evaluate
from vtc.demo.task import (
    CELL,
    COLORS,
    GRID,
    IMAGE_SIZE,
    QTYPES,
    SHAPES,
    TRAINING_QTYPES,
    blank_image,
    get_sample,
    scene_qas,
)

__all__ = ["train_grid", "train_1d", "main", "DEFAULT_LOG_DIR"]

DEFAULT_LOG_DIR = Path(__file__).resolve().parents[2] / "eval" / "results" / "demo_training"

# stage 2: ``stage2_images`` images per step, each with ``qas_per_image`` packed single-turn QA branches
_STAGE2 = dict(stage2_images=16, qas_per_image=16, lr=1e-3, weight_decay=0.0)
GRID_DEFAULTS = dict(
    stage1_steps=2400,
    stage1_batch=32,
    lm_cell_images=32,
    lm_cell_qas_per_image=8,
    lm_cell_steps=800,
    lm_cell_relative_steps=600,
    lm_steps=600,
    lm_qas_per_image=24,
    lm_bg_start=100,
    lm_bg_end=500,
    align_steps=600,
    stage2_steps=1600,
    tower_lr_scale=0.1,
    bg_start=0,
    bg_end=0,
    **_STAGE2,
)
ORDERED_DEFAULTS = dict(
    align_steps=1000, bridge_steps=400, stage2_steps=2000, tower_lr_scale=0.1, nested_full=0.35, **_STAGE2
)


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


N_PAIRS = len(SHAPES) * len(COLORS)
PATCH_GRID = IMAGE_SIZE // PATCH  # patches per side of the demo towers


def _pair(o) -> int:
    return SHAPES.index(o.shape) * len(COLORS) + list(COLORS).index(o.color)


_PATCH_CENTRES = (np.arange(PATCH_GRID) + 0.5) * PATCH


def _covered(o) -> np.ndarray:
    """(14, 14) bool: the patches whose centre lies inside object ``o``'s bounding square."""
    h = o.px / 2
    return (np.abs(_PATCH_CENTRES[:, None] - o.cy) <= h) & (np.abs(_PATCH_CENTRES[None, :] - o.cx) <= h)


def _tower_targets(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 targets: (B, 24) which colour-shape pairs are in the scene, and (B, 196) the pair (1 + index) of
    the object under each patch centre (0: background)."""
    pairs = np.zeros((len(scenes), N_PAIRS), dtype=np.float32)
    patches = np.zeros((len(scenes), PATCH_GRID, PATCH_GRID), dtype=np.int64)
    for b, scene in enumerate(scenes):
        for o in scene:
            pairs[b, _pair(o)] = 1
            patches[b][_covered(o)] = 1 + _pair(o)
    return torch.from_numpy(pairs), torch.from_numpy(patches.reshape(len(scenes), -1))


class _TowerHead(nn.Module):
    """Stage-1 objectives of the CLIP tower (Radford et al., 2021, scaled down to a synthetic world):

    - the pooled CLS embedding names the objects of the scene (multi-label over the 24 colour-shape pairs, a
      bag-of-objects caption, as a CLIP text side would), so CLS attention gathers the object patches;
    - every patch names the object under it (dense, background included; object patches weighted up), so the
      patch features the LLM reads carry colour and shape;
    - every patch names its row and column in the 14 x 14 grid, so the features say where they are (without it,
      the object patches' 3-way column is linearly decodable at chance level and position questions are
      unanswerable from the image tokens).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.cls = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, N_PAIRS))
        self.patch = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1 + N_PAIRS + 2 * PATCH_GRID))

    def loss(self, out, targets) -> tuple[torch.Tensor, dict]:
        """``out``: the CLIP tower's output (``last_hidden_state`` with CLS first, ``pooler_output``)."""
        pairs, patches = (t.to(out.pooler_output.device) for t in targets)
        cls_logits = self.cls(out.pooler_output)
        cls_loss = F.binary_cross_entropy_with_logits(cls_logits, pairs) * N_PAIRS / 4
        all_logits = self.patch(out.last_hidden_state[:, 1:])
        logits = all_logits[..., : 1 + N_PAIRS].flatten(0, 1)
        flat = patches.flatten()
        obj = flat > 0
        patch_loss = F.cross_entropy(logits, flat) + 2 * F.cross_entropy(logits[obj], flat[obj])
        idx = torch.arange(PATCH_GRID**2, device=flat.device).expand(patches.shape[0], -1)
        rows, cols = all_logits[..., 1 + N_PAIRS :].split(PATCH_GRID, dim=-1)
        pos_loss = F.cross_entropy(rows.flatten(0, 1), (idx // PATCH_GRID).flatten()) + F.cross_entropy(
            cols.flatten(0, 1), (idx % PATCH_GRID).flatten()
        )
        with torch.no_grad():
            metrics = {
                "cls_exact": ((cls_logits > 0) == (pairs > 0)).all(-1).float().mean(),
                "object_patch_acc": (logits[obj].argmax(-1) == flat[obj]).float().mean(),
                "column_acc": (cols.argmax(-1) == idx % PATCH_GRID).float().mean(),
            }
        return cls_loss + patch_loss + pos_loss, metrics


def pretrain_tower(clip_vision_model, processor, steps: int, batch: int, device, log, seed: int, desc: str):
    """Stage 1: the CLIP tower with the :class:`_TowerHead` objectives on fresh synthetic scenes."""
    from tqdm.auto import tqdm

    from vtc.demo.task import random_scene, render

    torch.manual_seed(seed)
    head = _TowerHead(clip_vision_model.config.hidden_size).to(device)
    params = list(clip_vision_model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.98))
    val = [get_sample("val", i) for i in range(128)]
    val_pv = _pixel_values(processor, [s.image for s in val], device)
    val_tg = _tower_targets([s.scene for s in val])
    clip_vision_model.train()
    bar = tqdm(range(steps), desc=f"{desc} stage1 (tower)")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = 1e-3 * _lr_factor(step, steps, max(1, steps // 20))
        scenes, images = [], []
        for i in range(batch):  # stage-1 scenes come from their own seed range
            rng = np.random.default_rng([seed, 1, step, i])
            scenes.append(random_scene(rng))
            images.append(render(scenes[-1], rng))
        pv = _pixel_values(processor, images, device)
        loss, m = head.loss(clip_vision_model(pv), _tower_targets(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", obj=f"{m['object_patch_acc'].item():.2f}")
        if step % 100 == 0 or step == steps - 1:
            clip_vision_model.eval()
            with torch.no_grad():
                _, vm = head.loss(clip_vision_model(val_pv), val_tg)
            clip_vision_model.train()
            log(
                f"stage1 step {step} loss {loss.item():.4f} val cls_exact {vm['cls_exact'].item():.3f} "
                f"object_patch_acc {vm['object_patch_acc'].item():.3f} column_acc {vm['column_acc'].item():.3f}"
            )
    return head


def _save_parts(path: Path, parts: dict[str, dict]) -> None:
    """Write several state dicts to one safetensors cache file, keys prefixed ``{part}.``; atomically (a stopped
    run leaves no half-written cache)."""
    from safetensors.torch import save_file

    state = {f"{name}.{k}": v.detach().cpu().contiguous() for name, sd in parts.items() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.rename(path)


def _load_parts(path: Path, device) -> dict[str, dict]:
    """The state dicts of a :func:`_save_parts` file, by part name."""
    from safetensors.torch import load_file

    parts: dict[str, dict] = {}
    for key, value in load_file(str(path), device=str(device)).items():
        name, _, rest = key.partition(".")
        parts.setdefault(name, {})[rest] = value
    return parts


def stage1_tower(
    clip_vision_model, processor, hp: dict, device, log, seed: int, desc: str, cache_dir: Path, reuse: bool = False
):
    """Stage 1, shared by both models: their CLIP towers have the same config, init and data, so the result
    is identical. It is saved as ``cache_dir/stage1_s{steps}_b{batch}_seed{seed}.safetensors`` and, with
    ``reuse=True`` (``--model all`` does this for the 1D model), loaded instead of being recomputed."""
    path = Path(cache_dir) / f"stage1_v3_s{hp['stage1_steps']}_b{hp['stage1_batch']}_seed{seed}.safetensors"
    if reuse and path.exists():
        # leave the torch RNG where training leaves it (seeded, the head's init, nothing drawn while training), so
        # later stages start from the same random state whether stage 1 was trained or loaded
        torch.manual_seed(seed)
        head = _TowerHead(clip_vision_model.config.hidden_size).to(device)
        parts = _load_parts(path, device)
        clip_vision_model.load_state_dict(parts["tower"])
        head.load_state_dict(parts["head"])
        log(f"stage1: loaded the shared stage-1 tower from {path}")
        return head
    head = pretrain_tower(clip_vision_model, processor, hp["stage1_steps"], hp["stage1_batch"], device, log, seed, desc)
    _save_parts(path, {"tower": clip_vision_model.state_dict(), "head": head.state_dict()})
    log(f"stage1: saved the tower to {path}")
    return head


def packed_sequences(
    tokenizer,
    samples,
    k: int,
    n_image_tokens: int,
    seed: int = 777,
    qtypes: tuple[str, ...] = QTYPES,
    own_first: bool = True,
    with_qtypes: bool = False,
):
    """LLaVA-style training text for ``samples`` with shared-prefix packing.

    Each row is ``<s> USER : <image> x n_image_tokens`` followed by ``k`` QA branches ``{q} ASSISTANT : {a} </s>``
    (the sample's own QA first, then ``k - 1`` more about the same scene, of question types drawn from ``qtypes``;
    with ``own_first=False`` all ``k`` are drawn from ``qtypes``). Under :func:`packed_attention_mask`
    every branch sees the prefix and itself only, and its position ids restart right after the prefix, so each
    branch is exactly a single-turn prompt as the model is evaluated: no text can leak between branches.

    Returns ``(input_ids, segment, position_ids, labels)``, all (B, L) long: ``segment`` is 0 on the prefix,
    ``j + 1`` on branch ``j`` and -1 on right padding; ``labels`` are the answer and its ``</s>`` (-100 elsewhere).
    ``with_qtypes=True`` adds a fifth item: the question type of every branch, row by row, branch by branch.
    """
    ids_of = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix = [tokenizer.bos_token_id] + ids_of("USER:") + [IMAGE_TOKEN_ID] * n_image_tokens
    p = len(prefix)
    rows, branch_qtypes = [], []
    for s in samples:
        rng = np.random.default_rng([seed, *s.seed])
        own = [(s.question, s.answer, s.qtype)] if own_first else []
        qas = own + scene_qas(s.scene, rng, k - len(own), qtypes)
        branch_qtypes += [t for _, _, t in qas]
        ids, seg, pos, lab = list(prefix), [0] * p, list(range(p)), [-100] * p
        for j, (q, a, _) in enumerate(qas):
            qi, ai = ids_of(f"{q} ASSISTANT:"), ids_of(f"{a}</s>")
            ids += qi + ai
            seg += [j + 1] * (len(qi) + len(ai))
            pos += range(p, p + len(qi) + len(ai))
            lab += [-100] * len(qi) + ai
        rows.append((ids, seg, pos, lab))
    n = max(len(r[0]) for r in rows)
    pad = lambda i, v: torch.tensor([r[i] + [v] * (n - len(r[i])) for r in rows])  # noqa: E731
    out = pad(0, tokenizer.pad_token_id), pad(1, -1), pad(2, 0), pad(3, -100)
    return (*out, branch_qtypes) if with_qtypes else out


def packed_attention_mask(segment: torch.Tensor, key_drop: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, L, L) bool mask for :func:`packed_sequences`: causal, a branch sees the prefix (segment 0) and
    itself, padding is seen by nobody (it sees itself so that no row is empty). ``key_drop`` (B, L) hides tokens
    from every query (dropped background patches, truncated latents)."""
    n = segment.shape[1]
    idx = torch.arange(n, device=segment.device)
    causal = idx[:, None] >= idx[None, :]
    sq, sk = segment[:, :, None], segment[:, None, :]
    visible = (sk >= 0) & ((sk == 0) | (sq == sk))
    if key_drop is not None:
        visible = visible & ~key_drop[:, None, :]
    return ((causal & visible) | torch.eye(n, dtype=torch.bool, device=segment.device))[:, None]


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _grid_features(model, pv, samples=None):
    """``LlavaModel.get_image_features``: layer -2, CLS dropped, then the projector (no graph through a frozen
    tower)."""
    tower = model.model.vision_tower
    with torch.set_grad_enabled(torch.is_grad_enabled() and _trains(tower)):
        hs = tower(pv, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        if model.config.vision_feature_select_strategy == "default":
            hs = hs[:, 1:]
    return model.model.multi_modal_projector(hs)


def _ordered_features(model, pv, samples=None):
    """``OrderedVLMModel.get_image_features`` (no graph through a frozen CLIP encoder)."""
    tower = model.model.vision_tower
    with torch.set_grad_enabled(torch.is_grad_enabled() and _trains(tower.encoder)):
        enc = tower.encoder(pv, return_dict=True).last_hidden_state
    return model.model.multi_modal_projector(tower.resample(enc))


def _background_patches(scenes) -> torch.Tensor:
    """(B, 196) True where no object covers the patch centre."""
    return _tower_targets(scenes)[1] == 0


def _object_attributes(o) -> tuple[int, int, int]:
    """Colour, shape and size index of object ``o`` (the rows of :class:`SymbolicPatches`' tables)."""
    return list(COLORS).index(o.color), SHAPES.index(o.shape), int(o.size == "large")


def patch_attributes(scenes) -> torch.Tensor:
    """(B, 196, 3) long: colour, shape and size index of the object under each patch centre (-1 for background)."""
    out = np.full((len(scenes), PATCH_GRID, PATCH_GRID, 3), -1, dtype=np.int64)
    for b, scene in enumerate(scenes):
        for o in scene:
            out[b][_covered(o)] = _object_attributes(o)
    return torch.from_numpy(out.reshape(len(scenes), -1, 3))


# the 3 x 3 scene cell (task.GRID) that each patch row / column lies in: objects never cross a cell border
_PATCH_CELL = torch.from_numpy((_PATCH_CENTRES // CELL).astype(np.int64))


class SymbolicPatches(nn.Module):
    """Image tokens from the scene's ground truth, for pretraining the LM on a symbolic copy of the task before it
    sees pixels (a real LLaVA starts from a pretrained LM): an object patch is the sum of learned colour, shape
    and size embeddings, a background patch a learned background embedding, each plus learned embeddings of the
    patch's row and column in the 14 x 14 grid and of the scene cell's row and column (3 x 3). The cell terms
    are the same on every patch of an object, so its position can be read like its colour (the fine terms alone
    differ from patch to patch, and reading an object's position from them stayed at chance)."""

    def __init__(self, dim: int, std: float = 0.02):
        super().__init__()
        self.color = nn.Parameter(torch.randn(len(COLORS), dim) * std)
        self.shape = nn.Parameter(torch.randn(len(SHAPES), dim) * std)
        self.size = nn.Parameter(torch.randn(2, dim) * std)
        self.background = nn.Parameter(torch.randn(dim) * std)
        self.row = nn.Parameter(torch.randn(PATCH_GRID, dim) * std)
        self.col = nn.Parameter(torch.randn(PATCH_GRID, dim) * std)
        self.cell_row = nn.Parameter(torch.randn(GRID, dim) * std)
        self.cell_col = nn.Parameter(torch.randn(GRID, dim) * std)

    @property
    def pos(self) -> torch.Tensor:
        """(196, dim) position embedding of each patch: its row's and column's, and its cell's row's and column's."""
        cell = _PATCH_CELL.to(self.row.device)
        rows, cols = self.row + self.cell_row[cell], self.col + self.cell_col[cell]
        return (rows[:, None] + cols[None, :]).flatten(0, 1)

    def _tokens(self, attr: torch.Tensor) -> torch.Tensor:
        c, s, z = attr.clamp(min=0).unbind(-1)
        obj = self.color[c] + self.shape[s] + self.size[z]
        return torch.where(attr[..., :1] >= 0, obj, self.background)

    def forward(self, samples) -> torch.Tensor:
        """(B, 196, dim): one token per patch."""
        return self._tokens(patch_attributes([s.scene for s in samples]).to(self.pos.device)) + self.pos

    def cells(self, samples) -> torch.Tensor:
        """(B, 9, dim): one token per scene cell (raster order), its object's (or the background's) embeddings plus
        the cell's row and column: the coarse copy of the image that the LM learns on first."""
        attr = torch.full((len(samples), GRID * GRID, 3), -1, dtype=torch.long)
        for b, smp in enumerate(samples):
            for o in smp.scene:
                attr[b, o.row * GRID + o.col] = torch.tensor(_object_attributes(o))
        pos = (self.cell_row[:, None] + self.cell_col[None, :]).flatten(0, 1)
        return self._tokens(attr.to(pos.device)) + pos


def _regression_step(opt, pred: torch.Tensor, target: torch.Tensor, bar, log, label: str, step: int, steps: int):
    """One step of the alignment stages: normalised MSE (MSE over the target's variance), logged every 20 steps."""
    loss = (pred - target).pow(2).mean() / target.var()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    bar.set_postfix(loss=f"{loss.item():.3f}")
    if step % 20 == 0 or step == steps - 1:
        log(f"{label} step {step} normalised_mse {loss.item():.4f}")


def align_projector(model, processor, symbolic: SymbolicPatches, hp: dict, device, log, seed: int, desc: str):
    """LLaVA's feature-alignment stage: only the projector trains (tower and LM frozen). Here its target is explicit:
    each projected patch regresses onto the LM's symbolic copy of that patch (:class:`SymbolicPatches`), so image
    tokens arrive in the space the pretrained LM already reads."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    proj = model.model.multi_modal_projector
    opt = torch.optim.AdamW(proj.parameters(), lr=hp["lr"], betas=(0.9, 0.98), weight_decay=0.0)
    steps, n_img = hp["align_steps"], 2 * hp["stage2_images"]
    bar = tqdm(range(steps), desc=f"{desc} alignment (projector)")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = hp["lr"] * _lr_factor(step, steps, max(1, steps // 20))
        # the alignment images come after the stage-2 range of the train split
        first = (hp["stage2_steps"] + step) * n_img
        samples = [get_sample("train", i) for i in range(first, first + n_img)]
        with torch.no_grad():
            target = symbolic(samples)
        pred = _grid_features(model, _pixel_values(processor, [s.image for s in samples], device))
        _regression_step(opt, pred, target, bar, log, "align", step, steps)


def _train_vlm(
    model,
    processor,
    frozen: list,
    hp: dict,
    device,
    log,
    seed: int,
    desc: str,
    features,
    out: Path,
    nested: int | None = None,
    eval_every: int = 200,
    extra_params: tuple = (),
    steps: int | None = None,
    bg: tuple[int, int] | None = None,
    needs_pixels: bool = True,
    constant_lr: bool = False,
    qas: int | None = None,
    qtypes: tuple[str, ...] = TRAINING_QTYPES,
    own_first: bool = True,
    first_sample: int = 0,
    n_image_tokens: int | None = None,
    images: int | None = None,
    tower: nn.Module | None = None,
) -> None:
    """Stage 2 (LLaVA's visual instruction tuning, scaled down): the projector (and the 1D model's resampler) and
    the LM learn the VQA task from packed single-turn branches, answer-only loss; the CLIP ``tower``, if given,
    trains at ``hp["tower_lr_scale"]`` times the learning rate (frozen at 0), as LLaVA-style recipes that unfreeze
    the vision tower do, and is frozen again afterwards.

    Two curricula make content-based retrieval learnable by a small LM trained from scratch (it otherwise sits on
    the blind plateau: attention spread over 196 patches carries almost no gradient towards the few that matter):

    - grid model, ``bg = (start, end)`` (default ``hp["bg_start"], hp["bg_end"]``; ``end = 0`` turns it off):
      background patches are hidden from attention (position ids unchanged), then shown with a probability rising
      linearly to 1, so the LM first learns to read objects and then to ignore the background; all 196 patches are
      visible for the rest of training, as at test time;
    - 1D model, nested dropout (FlexTok): for a fraction of the images only a random prefix of the latents is
      visible, with position ids of the branches either kept or renumbered, so every prefix is in distribution.

    The extra QA branches are drawn from ``qtypes`` (``own_first=False``: all of them, not the sample's own QA
    first; a type listed twice is drawn twice as often). Images are train samples
    ``first_sample + step * images ...`` (default ``hp["stage2_images"]``); ``n_image_tokens`` overrides the number
    of image tokens per image (``features`` must return that many). ``frozen`` parameters neither train nor get
    gradients during the stage; their ``requires_grad`` is restored afterwards.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 12345])
    tok = processor.tokenizer
    tower_params = list(tower.parameters()) if tower is not None else []
    tower_scale = hp["tower_lr_scale"] if tower is not None else 0.0
    if tower is not None:
        tower.requires_grad_(tower_scale > 0)
    frozen_ids = {id(p) for p in frozen} | {id(p) for p in tower_params}
    was_trainable = [p.requires_grad for p in frozen]
    for p in frozen:  # no gradients computed for them during this stage
        p.requires_grad_(False)
    train = [p for p in model.parameters() if id(p) not in frozen_ids] + list(extra_params)
    groups = [
        {"params": [p for p in train if p.ndim >= 2], "weight_decay": hp["weight_decay"], "lr_scale": 1.0},
        {"params": [p for p in train if p.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    if tower_scale > 0:
        groups.append({"params": tower_params, "weight_decay": 0.0, "lr_scale": tower_scale})
        train += tower_params
    opt = torch.optim.AdamW(groups, lr=hp["lr"], betas=(0.9, 0.98))
    steps = steps or hp["stage2_steps"]
    n_img, k = images or hp["stage2_images"], qas or hp["qas_per_image"]
    bg = bg or (hp.get("bg_start", 0), hp.get("bg_end", 0))
    n_tokens = n_image_tokens or nested or (IMAGE_SIZE // PATCH) ** 2
    embed = model.get_input_embeddings()
    bar = tqdm(range(steps), desc=f"{desc} stage2 (VLM)")
    ema = None
    for step in bar:
        model.train()
        for g in opt.param_groups:
            warm = max(1, steps // 20)
            factor = min(1.0, (step + 1) / warm) if constant_lr else _lr_factor(step, steps, warm)
            g["lr"] = hp["lr"] * factor * g["lr_scale"]
        first = first_sample + step * n_img
        samples = [get_sample("train", i) for i in range(first, first + n_img)]
        ids, seg, pos, labels, branch_qtypes = packed_sequences(
            tok, samples, k, n_tokens, qtypes=qtypes, own_first=own_first, with_qtypes=True
        )
        img = ids == IMAGE_TOKEN_ID
        drop = torch.zeros_like(img)
        if nested is None and bg[1] > 0:  # background curriculum (grid)
            frac = min(1.0, max(0.0, (step - bg[0]) / max(1, bg[1] - bg[0])))
            hidden = _background_patches([s.scene for s in samples]) & (torch.rand(n_img, n_tokens) >= frac)
            drop[img] = hidden.flatten()
        elif nested is not None:  # nested dropout (1D)
            p0 = int(img[0].nonzero()[0])
            for r in range(n_img):
                if rng.random() < hp["nested_full"]:
                    continue
                keep = int(rng.integers(1, nested))
                drop[r, p0 + keep : p0 + nested] = True
                if rng.random() < 0.5:  # renumbered: the branches follow the kept latents directly
                    br = seg[r] > 0
                    pos[r, br] -= nested - keep
        mask = packed_attention_mask(seg, drop)
        pv = _pixel_values(processor, [s.image for s in samples], device) if needs_pixels else None
        feats = features(model, pv, samples)
        emb = embed(ids.to(device)).masked_scatter(img.to(device).unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
        res = model(
            inputs_embeds=emb, attention_mask=mask.to(device), position_ids=pos.to(device), labels=labels.to(device)
        )
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(train, 1.0)
        opt.step()
        li = res.loss.item()
        ema = li if ema is None else 0.95 * ema + 0.05 * li
        bar.set_postfix(loss=f"{ema:.3f}")
        if step % 20 == 0 or step == steps - 1:
            with torch.no_grad():  # first answer token of every branch
                target = labels[:, 1:].to(device)
                answer = (target != -100) & (labels[:, :-1].to(device) == -100)
                hit = res.logits[:, :-1].argmax(-1)[answer] == target[answer]  # row-major: branch order
                acc = hit.float().mean().item()
            by_type = {}
            for t, h in zip(branch_qtypes, hit.tolist()):
                by_type.setdefault(t, []).append(h)
            per_type = " ".join(f"{t} {sum(v) / len(v):.2f}" for t, v in sorted(by_type.items()))
            log(
                f"{desc} step {step} loss {li:.4f} ema {ema:.4f} train_acc {acc:.3f} ({per_type}) "
                f"lr {opt.param_groups[0]['lr']:.2e}"
            )
        if needs_pixels and (step + 1) % eval_every == 0 and step + 1 < steps:
            r = evaluate(model, processor, split="val", n=300, batch_size=50, mode="first_token")
            log(f"stage2 step {step + 1} val_first_token_acc {r['accuracy']:.4f} per_type {json.dumps(r['per_type'])}")
            _save(model, processor, out, log)  # checkpoint (overwritten by the final model)
    for p, flag in zip(frozen, was_trainable):
        p.requires_grad_(flag)
    if tower is not None:
        tower.requires_grad_(False)
    model.eval()


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


_LM_STAGE_KEYS = (
    "lm_cell_images",
    "lm_cell_qas_per_image",
    "lm_cell_steps",
    "lm_cell_relative_steps",
    "lm_steps",
    "lm_qas_per_image",
    "lm_bg_start",
    "lm_bg_end",
    "lr",
    "weight_decay",
    "stage2_images",
)


def _lm_cache_path(log_dir: Path, hp: dict, seed: int) -> Path:
    """Where the grid model's stage-2a result (LM and symbolic tables) is cached: the name encodes every
    hyperparameter the stage reads, so a changed recipe never loads a stale LM."""
    key = json.dumps({k: hp[k] for k in _LM_STAGE_KEYS}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(log_dir) / f"lm2a_v1_{digest}_seed{seed}.safetensors"


def _is_lm_key(name: str) -> bool:
    """A grid-model state-dict key that stage 2a trains (not the tower's or the projector's)."""
    return "vision_tower" not in name and "multi_modal_projector" not in name


def _save_lm_state(model, symbolic: nn.Module, path: Path) -> None:
    lm = {k: v for k, v in model.state_dict().items() if _is_lm_key(k)}
    _save_parts(path, {"model": lm, "symbolic": symbolic.state_dict()})


def _load_lm_state(model, symbolic: nn.Module, path: Path, device) -> None:
    parts = _load_parts(path, device)
    result = model.load_state_dict(parts["model"], strict=False)
    lm_missing = [k for k in result.missing_keys if _is_lm_key(k)]
    if lm_missing or result.unexpected_keys:
        raise RuntimeError(f"{path} does not match the grid model: {lm_missing or result.unexpected_keys}")
    symbolic.load_state_dict(parts["symbolic"])


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
    reuse_lm: bool = False,
    **overrides,
) -> dict:
    """Train ``vtc-tiny-llava`` (stock LLaVA, CLIP tower with CLS) from scratch; save it; return metrics.

    ``reuse_stage1`` / ``reuse_lm`` load the cached stage-1 tower / stage-2a LM (saved in ``log_dir`` by an
    earlier run with the same hyperparameters and seed) instead of recomputing them; the result is the same."""
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
    stage1_tower(tower, processor, hp, dev, log, seed, "grid", log_dir, reuse_stage1)
    t1 = time.time()
    tower.requires_grad_(False)
    # stage 2a: LM pretraining on the symbolic copy of the task (image tokens from the scene's ground truth), from
    # coarse to fine. Phase 1: one token per 3 x 3 scene cell, every question type but relative, plus "where"
    # questions (row / column of a named object); phase 2: the same cell tokens, relative questions too; phase 3:
    # one token per patch (196), every question type, with the background curriculum. Relative questions stay at
    # chance when trained from the start, and are learned quickly once the LM can read one object's position.
    symbolic = SymbolicPatches(model.config.text_config.hidden_size).to(dev)
    symbolic_stage = dict(
        model=model,
        processor=processor,
        frozen=list(tower.parameters()) + list(model.model.multi_modal_projector.parameters()),
        hp=hp,
        device=dev,
        log=log,
        features=lambda m, pv, samples: symbolic(samples),
        out=out,
        extra_params=tuple(symbolic.parameters()),
        constant_lr=True,
        qas=hp["lm_qas_per_image"],
        needs_pixels=False,
    )
    cells = dict(
        symbolic_stage,
        features=lambda m, pv, samples: symbolic.cells(samples),
        n_image_tokens=GRID * GRID,
        images=hp["lm_cell_images"],
        qas=hp["lm_cell_qas_per_image"],
    )
    lm_cache = _lm_cache_path(log_dir, hp, seed)
    if reuse_lm and lm_cache.exists():
        _load_lm_state(model, symbolic, lm_cache, dev)
        log(f"stage 2a: loaded the symbolic-stage LM from {lm_cache}")
    else:
        # on the cell tokens "where" questions get twice the weight of the other types; relative ones, once added,
        # three times (one share in seven left them at chance for 600 steps with "where" at 0.95)
        no_relative = tuple(t for t in QTYPES if t != "relative") + ("where", "where")
        _train_vlm(
            **cells,
            seed=seed + 11,
            desc="grid symbolic cells",
            steps=hp["lm_cell_steps"],
            qtypes=no_relative,
            own_first=False,
            first_sample=10_000_000,
        )
        _train_vlm(
            **cells,
            seed=seed + 12,
            desc="grid symbolic cells +relative",
            steps=hp["lm_cell_relative_steps"],
            qtypes=TRAINING_QTYPES + ("relative", "relative", "where"),
            first_sample=12_000_000,
        )
        _train_vlm(
            **symbolic_stage,
            seed=seed + 1,
            desc="grid symbolic",
            steps=hp["lm_steps"],
            bg=(hp["lm_bg_start"], hp["lm_bg_end"]),
        )
        _save_lm_state(model, symbolic, lm_cache)
        log(f"stage 2a: saved the symbolic-stage LM to {lm_cache}")
    t2a = time.time()
    align_projector(model, processor, symbolic, hp, dev, log, seed + 2, "grid")
    # stage 2c: pixels; the tower is unfrozen at a tenth of the learning rate
    _train_vlm(model, processor, [], hp, dev, log, seed + 3, "grid", _grid_features, out, tower=tower)
    train_time = time.time() - t0
    log(f"training wall time {train_time:.0f}s (stage1 {t1 - t0:.0f}s, stage 2a {t2a - t1:.0f}s)")
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


def _load_grid(model, grid_dir: Path, log):
    """Copy the trained grid model's CLIP tower, language model and LM head from ``grid_dir`` into the 1D model
    ``model``; return the grid model (the teacher of :func:`align_latents`)."""
    from transformers import LlavaForConditionalGeneration

    if not (grid_dir / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the 1D model starts from the trained grid model, but {grid_dir} has no model.safetensors; "
            "train the grid model first (`--model grid` or `--model all`)"
        )
    grid = LlavaForConditionalGeneration.from_pretrained(grid_dir)
    model.model.vision_tower.encoder.load_state_dict(grid.model.vision_tower.state_dict())
    model.model.language_model.load_state_dict(grid.model.language_model.state_dict())
    model.lm_head.load_state_dict(grid.lm_head.state_dict())
    log(f"1d: CLIP tower and language model initialised from the grid model at {grid_dir}")
    return grid


def _cell_targets(grid_feats: torch.Tensor, scenes) -> torch.Tensor:
    """(B, 9, D): for each 3 x 3 scene cell in raster order, the mean of the grid model's image tokens over the
    patches of the object in it, or over the cell's patches when it is empty."""
    cell = (_PATCH_CELL[:, None] * GRID + _PATCH_CELL[None, :]).flatten()  # (196,) cell of each patch
    weights = torch.zeros(len(scenes), GRID * GRID, PATCH_GRID * PATCH_GRID)
    weights[:, cell, torch.arange(cell.numel())] = 1.0
    for b, scene in enumerate(scenes):
        for o in scene:
            covered = torch.from_numpy(_covered(o).reshape(-1))
            if covered.any():
                weights[b, o.row * GRID + o.col] = covered.float()
    weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(grid_feats) @ grid_feats


def align_latents(model, grid, processor, hp: dict, device, log, seed: int):
    """Feature alignment of the 1D model (only the resampler and projector train): latent ``j < 9`` regresses onto
    the trained grid model's image tokens of scene cell ``j`` (its object's patches, averaged), so the first
    latents arrive in the space the shared LM already reads; VQA training then takes over."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    tower = model.model.vision_tower
    train = [p for n, p in tower.named_parameters() if not n.startswith("encoder.")]
    train += list(model.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(train, lr=hp["lr"], betas=(0.9, 0.98), weight_decay=0.0)
    steps, n_img = hp["align_steps"], 2 * hp["stage2_images"]
    grid = grid.to(device).eval()
    bar = tqdm(range(steps), desc="1d alignment (resampler, projector)")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = hp["lr"] * _lr_factor(step, steps, max(1, steps // 20))
        first = 20_000_000 + step * n_img
        samples = [get_sample("train", i) for i in range(first, first + n_img)]
        pv = _pixel_values(processor, [s.image for s in samples], device)
        with torch.no_grad():
            target = _cell_targets(_grid_features(grid, pv), [s.scene for s in samples])
            feats = tower.encoder(pv).last_hidden_state
        latents = model.model.multi_modal_projector(tower.resample(feats))[:, : GRID * GRID]
        _regression_step(opt, latents, target, bar, log, "1d align", step, steps)
    grid.cpu()


def train_1d(
    out: str | Path | None = None,
    log_dir: str | Path | None = None,
    seed: int = 0,
    device: str | None = None,
    n_test: int = 600,
    threads: int = 2,
    lm_from: str | Path | None = None,
    **overrides,
) -> dict:
    """Train ``vtc-tiny-1d`` (32 ordered latents, nested dropout); save it; return metrics.

    It is built from the trained grid model at ``lm_from`` (default: ``tiny-llava`` next to ``out``, which
    ``--model all`` trains first), as VLM families share one LM and vision encoder: the CLIP tower, the LM
    (embeddings, decoder, head) come from it; the resampler and projector start from scratch. Stages:
    (1) alignment, only resampler and projector train: the first 9 latents regress onto the grid model's image
    tokens of the 9 scene cells (:func:`align_latents`); (2) bridge, VQA with nested dropout and the LM frozen,
    so the latents learn what the LM reads before the LM moves; (3) VQA with nested dropout, everything trains
    (the CLIP tower at ``tower_lr_scale`` times the learning rate)."""
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
    clip.requires_grad_(False)
    grid = _load_grid(model, Path(lm_from) if lm_from else out.parent / "tiny-llava", log)
    align_latents(model, grid, processor, hp, dev, log, seed + 2)
    del grid
    lm = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    vqa = dict(
        model=model,
        processor=processor,
        hp=hp,
        device=dev,
        log=log,
        features=_ordered_features,
        out=out,
        nested=model.config.n_latents,
    )
    _train_vlm(
        **vqa,
        frozen=list(clip.parameters()) + lm,
        seed=seed + 4,
        desc="1d bridge",
        steps=hp["bridge_steps"],
        first_sample=30_000_000,
    )
    _train_vlm(**vqa, frozen=[], seed=seed + 1, desc="1d", tower=clip)
    train_time = time.time() - t0
    log(f"training wall time {train_time:.0f}s")
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
    from vtc.demo.task import format_prompt, get_samples

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
    ap = argparse.ArgumentParser(prog="python eval/train_demo.py", description="Retrain the demo VLMs from scratch (fixed seed).")
    ap.add_argument("--model", choices=["grid", "1d", "all"], default="all")
    ap.add_argument("--out", default=None, help="folder for the models (default: vtc/assets)")
    ap.add_argument("--log-dir", default=None, help="default: eval/results/demo_training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--stage1-steps", type=int, default=None, help="grid model (the 1D model reuses its tower)")
    ap.add_argument("--stage2-steps", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument(
        "--reuse-stage1",
        action="store_true",
        help="grid model: load the saved stage-1 tower if present",
    )
    ap.add_argument(
        "--reuse-lm",
        action="store_true",
        help="grid model: load the saved stage-2a (symbolic) LM if present, for reruns of the later stages",
    )
    args = ap.parse_args(argv)
    root = Path(args.out) if args.out else ASSETS
    over = {}
    if args.stage2_steps is not None:
        over["stage2_steps"] = args.stage2_steps
    grid_over = dict(over)
    if args.stage1_steps is not None:
        grid_over["stage1_steps"] = args.stage1_steps
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
            args.reuse_lm,
            **grid_over,
        )
    if args.model in ("1d", "all"):
        results["1d"] = train_1d(
            root / "tiny-1d",
            args.log_dir,
            args.seed,
            args.device,
            args.n_test,
            args.threads,
            **over,
        )
    for name, m in results.items():
        print(
            f"{name}: test {m['test_accuracy']:.3f} blind {m['blind_test_accuracy']:.3f} "
            f"train {m['train_seconds'] / 60:.1f} min, {m['bytes_on_disk'] / 1e6:.1f} MB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
