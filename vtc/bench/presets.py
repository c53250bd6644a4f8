"""Architecture presets of ``vtc bench``: real model shapes with random weights, and synthetic inputs of the
real size (see :mod:`vtc.bench`)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ..models import get_adapter

__all__ = ["ArchSpec", "ARCHS", "DTYPES", "get_arch", "build_model", "random_fill_", "synthetic_inputs"]


# ---- architecture presets -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchSpec:
    """A model shape. ``text`` / ``vision`` are kwargs of the family's text / vision config, ``top`` of the
    top-level config; ``image_size`` the synthetic image (H, W); ``text_ids`` the range random text tokens are
    drawn from (no special tokens); ``bos`` an optional first token."""

    name: str
    family: str  # a key of FAMILY_CLASSES
    text: dict
    vision: dict
    top: dict = field(default_factory=dict)
    image_size: tuple[int, int] = (336, 336)
    text_ids: tuple[int, int] = (3, 1000)
    bos: int | None = 1
    description: str = ""

    @property
    def text_layers(self) -> int:
        return int(self.text["num_hidden_layers"])

    @property
    def vision_layers(self) -> int:
        return int(self.vision.get("num_hidden_layers", self.vision.get("depth", 0)))


_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  pad_token_id=0)
_VICUNA_13B = dict(_VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                   num_attention_heads=40, num_key_value_heads=40)
_LLAVA_TOP = dict(image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                  projector_hidden_act="gelu")
_QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 pad_token_id=151643, bos_token_id=151643, eos_token_id=151645,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
_QWEN_TOP = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                 vision_end_token_id=151653)

_MISTRAL_SMALL_31_TEXT = dict(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                              max_position_embeddings=131072, rms_norm_eps=1e-5, sliding_window=None,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0})
_PIXTRAL_MS31 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     head_dim=64, patch_size=14, image_size=1540, hidden_act="silu")
_MISTRAL3_TOP = dict(image_token_index=10, spatial_merge_size=2, vision_feature_layer=-1,
                     projector_hidden_act="gelu", multimodal_projector_bias=False, tie_word_embeddings=False)
_QWEN25_7B_INTERNVL = dict(vocab_size=151674, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                          rms_norm_eps=1e-6, pad_token_id=151643, bos_token_id=151643, eos_token_id=151645,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
_INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=448, patch_size=14, attention_bias=True, norm_type="layer_norm",
                       use_qk_norm=False, layer_norm_eps=1e-6, hidden_act="gelu")
_INTERNVL_TOP = dict(image_token_id=151667, downsample_ratio=0.5, projector_hidden_act="gelu",
                     vision_feature_layer=-1, vision_feature_select_strategy="default")

#: Qwen2-7B as the LLM of LLaVA-OneVision-7B (no M-RoPE). The llava-onevision-7b preset was checked against
#: transformers' convert_llava_onevision_weights_to_hf.py, which built llava-hf/llava-onevision-qwen2-7b-ov-hf: the
#: text config is Qwen/Qwen2-7B-Instruct's (28 layers, 3584 wide, 28 / 4 heads, 18944 MLP, vocab 152064) with
#: <image> and <video> added and the embeddings padded to a multiple of 64 (152064 + 2 -> 152128); the tower is
#: SigLIP so400m/14-384 with 26 layers and no head; the rest is LlavaOnevisionConfig's defaults (token ids
#: 151646 / 151647, vision_feature_layer -1, "full", anyres_max_9, the 6 x 6 pinpoints of 384 px).
_QWEN2_7B_TEXT = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                      pad_token_id=151643, bos_token_id=151643, eos_token_id=151645)
_SIGLIP_SO400M_384 = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                          num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                          vision_use_head=False)
_ONEVISION_TOP = dict(image_token_id=151646, video_token_id=151647, vision_feature_layer=-1,
                      vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                      image_grid_pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)])
_SIGLIP_SO400M_896 = dict(_SIGLIP_SO400M_384, num_hidden_layers=27, image_size=896)
_GEMMA3_4B = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024,
                  query_pre_attn_scalar=256, max_position_embeddings=131072, rms_norm_eps=1e-6,
                  pad_token_id=0, bos_token_id=2, eos_token_id=1)
_GEMMA3_12B = dict(_GEMMA3_4B, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                   num_attention_heads=16, num_key_value_heads=8)
_GEMMA3_TOP = dict(mm_tokens_per_image=256, image_token_id=262144, boi_token_id=255999, eoi_token_id=256000)
#: Qwen3-VL-8B (Qwen/Qwen3-VL-8B-Instruct config.json); transformers' Qwen3VLConfig defaults are not these shapes
_QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                 rms_norm_eps=1e-6, pad_token_id=151643, bos_token_id=151643, eos_token_id=151645,
                 rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                  "mrope_interleaved": True})
_QWEN3_VIT = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")

#: the tiny shapes of tests/tiny_models*.py (for the benchmark's own tests)
_TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=48,
                  patch_size=8, projection_dim=32)
_TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024, pad_token_id=0,
                   rms_norm_eps=1e-6)
_TINY_QWEN_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})

ARCHS: dict[str, ArchSpec] = {
    "llava-1.5-7b": ArchSpec(
        "llava-1.5-7b", "llava", _VICUNA_7B, _CLIP_L_336, _LLAVA_TOP,
        description="LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, 576 tokens), 2-layer GELU projector, Vicuna-7B"),
    "llava-1.5-13b": ArchSpec(
        "llava-1.5-13b", "llava", _VICUNA_13B, _CLIP_L_336, _LLAVA_TOP,
        description="LLaVA-1.5-13B: CLIP ViT-L/14-336, Vicuna-13B (40 layers, 5120 wide)"),
    "llava-next-7b": ArchSpec(
        "llava-next-7b", "llava_next", _VICUNA_7B, _CLIP_L_336,
        dict(_LLAVA_TOP, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
        image_size=(672, 672),
        description="LLaVA-NeXT-7B (v1.6 Vicuna): anyres, a 672 x 672 image = base + 2 x 2 crops = 2928 tokens"),
    "qwen2-vl-7b": ArchSpec(
        "qwen2-vl-7b", "qwen2_vl", _QWEN2_7B,
        dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, in_channels=3, patch_size=14,
             spatial_merge_size=2, temporal_patch_size=2),
        _QWEN_TOP, image_size=(672, 672), text_ids=(1000, 20000), bos=None,
        description="Qwen2-VL-7B: 32-block ViT (1280 wide), 2 x 2 merger, Qwen2-7B (GQA, M-RoPE); 672 px = 576 tokens"),
    "qwen2.5-vl-7b": ArchSpec(
        "qwen2.5-vl-7b", "qwen2_5_vl", _QWEN2_7B,
        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
             spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584, window_size=112,
             fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        _QWEN_TOP, image_size=(672, 672), text_ids=(1000, 20000), bos=None,
        description="Qwen2.5-VL-7B: 32-block windowed ViT (SwiGLU), Qwen2-7B; 672 px = 576 tokens"),
    "mistral-small-3.1-24b": ArchSpec(
        "mistral-small-3.1-24b", "mistral3", _MISTRAL_SMALL_31_TEXT, _PIXTRAL_MS31, _MISTRAL3_TOP,
        image_size=(896, 896), text_ids=(1000, 20000),
        description="Mistral-Small-3.1-24B: Pixtral tower (24 layers, 2D RoPE), 2 x 2 patch merger, Mistral 24B "
                    "(40 layers, GQA 32/8); 896 px = 32 x 32 tokens + 32 row separators"),
    "internvl3-8b": ArchSpec(
        "internvl3-8b", "internvl", _QWEN25_7B_INTERNVL, _INTERNVIT_300M, _INTERNVL_TOP,
        image_size=(896, 896), text_ids=(1000, 20000), bos=None,
        description="InternVL3-8B: InternViT-300M-448px-V2.5 (24 layers), pixel shuffle 0.5 + 2-layer GELU MLP, "
                    "Qwen2.5-7B; 896 px = 2 x 2 tiles + thumbnail = 1280 tokens"),
    # checked against HuggingFaceTB/SmolVLM2-2.2B-Instruct's config.json (SmolVLMForConditionalGeneration,
    # image_token_id 49190, scale_factor 3; text: hidden 2048, head_dim 64, intermediate 8192, 24 layers, max positions
    # 8192, no head counts given, so Llama's default 32 / 32 (= 2048 / 64), vocab 49280, RMS eps 1e-5) and the SmolVLM
    # paper's tower for the 2.2B (SigLIP-SO400M at 384 px, patch 14: 1152 wide, 4304 MLP, 27 layers, 16 heads)
    "smolvlm2-2.2b": ArchSpec(
        "smolvlm2-2.2b", "smolvlm",
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=49280, max_position_embeddings=8192, rms_norm_eps=1e-5,
             pad_token_id=2, bos_token_id=1, eos_token_id=2),
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
             patch_size=14),
        dict(image_token_id=49190, scale_factor=3), image_size=(1536, 1536), text_ids=(3, 49000),
        description="SmolVLM2-2.2B-Instruct: SigLIP so400m (27 layers, 384 px sub-images of 27 x 27 patches), pixel "
                    "shuffle 3 -> 81 tokens per sub-image, SmolLM2-1.7B; 1536 px = 4 x 4 crops + global = 1377"),
    "llava-onevision-7b": ArchSpec(
        "llava-onevision-7b", "llava_onevision", dict(_QWEN2_7B_TEXT, vocab_size=152128),
        _SIGLIP_SO400M_384, _ONEVISION_TOP, image_size=(768, 768), text_ids=(1000, 20000), bos=None,
        description="LLaVA-OneVision-7B: SigLIP-so400m/14-384 (26 layers, 729 tokens per crop), anyres_max_9, "
                    "Qwen2-7B; a 768 x 768 image = base + 2 x 2 crops + newlines = 3699 tokens"),
    "gemma3-4b": ArchSpec(
        "gemma3-4b", "gemma3", _GEMMA3_4B, _SIGLIP_SO400M_896, _GEMMA3_TOP, image_size=(896, 896),
        text_ids=(1000, 20000), bos=2,
        description="Gemma-3-4B: SigLIP-so400m/14-896 (4096 patches pooled 4 x 4 to 256 tokens), 34 layers "
                    "(5 sliding-window : 1 global), GQA 8 / 4 heads of 256"),
    "gemma3-12b": ArchSpec(
        "gemma3-12b", "gemma3", _GEMMA3_12B, _SIGLIP_SO400M_896, _GEMMA3_TOP, image_size=(896, 896),
        text_ids=(1000, 20000), bos=2,
        description="Gemma-3-12B: the 4B's tower, 48 layers 3840 wide, GQA 16 / 8 heads of 256"),
    "qwen3-vl-8b": ArchSpec(
        "qwen3-vl-8b", "qwen3_vl", _QWEN3_8B, _QWEN3_VIT, _QWEN_TOP, image_size=(768, 768), text_ids=(1000, 20000),
        bos=None, description="Qwen3-VL-8B: 27-block ViT (1152 wide, DeepStack after blocks 8 / 16 / 24), 2 x 2 "
                              "merger, Qwen3-8B (GQA, q/k norm, interleaved M-RoPE); 768 px = 576 tokens"),
    "tiny": ArchSpec(
        "tiny", "llava", _TINY_LLAMA, _TINY_CLIP, dict(_LLAVA_TOP, image_token_id=120),
        image_size=(48, 48), text_ids=(3, 100), description="tiny LLaVA (tests): 36 visual tokens"),
    "tiny-next": ArchSpec(
        "tiny-next", "llava_next", _TINY_LLAMA, _TINY_CLIP,
        dict(_LLAVA_TOP, image_token_id=120, image_grid_pinpoints=[[48, 48], [48, 96], [96, 48], [96, 96]]),
        image_size=(96, 96), text_ids=(3, 100), description="tiny LLaVA-NeXT (tests): base + 2 x 2 crops"),
    "tiny-internvl": ArchSpec(
        "tiny-internvl", "internvl", dict(_TINY_QWEN_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=4),
        dict(image_token_id=120, downsample_ratio=0.5), image_size=(40, 90), text_ids=(3, 100), bos=None,
        description="tiny InternVL (tests): 2 x 1 tiles + thumbnail of 4 x 4 shuffled tokens = 48"),
    "tiny-smolvlm": ArchSpec(
        "tiny-smolvlm", "smolvlm", _TINY_LLAMA,
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=48,
             patch_size=4),
        dict(image_token_id=120, scale_factor=3), image_size=(96, 48), text_ids=(3, 100),
        description="tiny SmolVLM (tests): 2 x 1 crops + global view of 4 x 4 shuffled tokens each"),
    "tiny-qwen2-vl": ArchSpec(
        "tiny-qwen2-vl", "qwen2_vl", _TINY_QWEN_TEXT,
        dict(depth=3, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, in_channels=3, patch_size=4,
             spatial_merge_size=2, temporal_patch_size=2),
        dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123),
        image_size=(32, 32), text_ids=(3, 100), bos=None, description="tiny Qwen2-VL (tests): 16 merged tokens"),
    "tiny-qwen2.5-vl": ArchSpec(
        "tiny-qwen2.5-vl", "qwen2_5_vl", _TINY_QWEN_TEXT,
        dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, patch_size=4,
             spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, window_size=16,
             fullatt_block_indexes=[1, 3], tokens_per_second=2),
        dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123),
        image_size=(32, 32), text_ids=(3, 100), bos=None, description="tiny Qwen2.5-VL (tests): 16 merged tokens"),
    "tiny-mistral3": ArchSpec(
        "tiny-mistral3", "mistral3", dict(_TINY_LLAMA, head_dim=16, sliding_window=None),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, head_dim=8,
             patch_size=4, image_size=64),
        dict(image_token_index=120, spatial_merge_size=2), image_size=(32, 48), text_ids=(14, 100),
        description="tiny Mistral 3 (tests): 32 x 48 px = 4 x 6 merged tokens + 4 row separators"),
}

#: ArchSpec.family -> the transformers model class a preset of that family builds (one entry per family)
FAMILY_CLASSES: dict[str, str] = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def get_arch(arch: str | ArchSpec) -> ArchSpec:
    if isinstance(arch, ArchSpec):
        return arch
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r} (allowed: {', '.join(ARCHS)})")
    return ARCHS[arch]


# ---- model ------------------------------------------------------------------------------------------------------------
def _hf_config(spec: ArchSpec, layers: int | None, vision_layers: int | None, attn: str):
    import transformers as tf

    text = dict(spec.text)
    vision = dict(spec.vision)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        text["num_hidden_layers"] = int(layers)
    if vision_layers is not None:
        if vision_layers < 2:
            raise ValueError(f"--vision-layers must be >= 2 (the features come from layer -2), got {vision_layers}")
        if "depth" in vision:
            vision["depth"] = int(vision_layers)
            if "fullatt_block_indexes" in vision:  # keep the full-attention blocks that exist, the last one full
                vision["fullatt_block_indexes"] = sorted({i for i in vision["fullatt_block_indexes"]
                                                          if i < vision_layers} | {vision_layers - 1})
            if "deepstack_visual_indexes" in vision:  # DeepStack blocks at the same share of the depth (distinct:
                # a tower shortened below 3 blocks keeps fewer levels; the FLOPs count the levels built)
                depth = int(spec.vision["depth"])
                vision["deepstack_visual_indexes"] = sorted({i * vision_layers // depth
                                                             for i in vision["deepstack_visual_indexes"]})
        else:
            vision["num_hidden_layers"] = int(vision_layers)
    name = FAMILY_CLASSES.get(spec.family)
    if name is None:  # pragma: no cover - presets are fixed
        raise ValueError(f"unknown family {spec.family!r} (allowed: {', '.join(FAMILY_CLASSES)})")
    cls = getattr(tf, name)
    # sub-configs are dicts: each family's config class fills in its default model types (CLIP / Llama for LLaVA)
    cfg = cls.config_class(text_config=text, vision_config=vision, **spec.top)
    cfg._attn_implementation = attn
    return cfg, cls


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


@torch.no_grad()
def random_fill_(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Fill every parameter cheaply: norm weights 1 and biases 0, other biases 0, everything else uniform noise
    of standard deviation ``std`` (``U(-std sqrt 3, std sqrt 3)``)."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    a = std * math.sqrt(3.0)
    for mod in model.modules():
        is_norm = "norm" in type(mod).__name__.lower()
        for name, p in mod.named_parameters(recurse=False):
            if is_norm:
                p.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                p.zero_()
            else:
                p.uniform_(-a, a, generator=g)
    return model


def build_model(arch: str | ArchSpec, *, layers: int | None = None, vision_layers: int | None = None,
                dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu", attn: str = "sdpa",
                seed: int = 0) -> torch.nn.Module:
    """A random-weight model of ``arch`` built directly on ``device`` in ``dtype`` (no slow initialisation)."""
    spec = get_arch(arch)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    cfg, cls = _hf_config(spec, layers, vision_layers, attn)
    with _default_dtype(dtype), torch.device(device), _no_init_weights():
        model = cls(cfg)
    model.eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    random_fill_(model, seed)
    model._vtc_bench_arch = spec.name
    return model


# ---- inputs -----------------------------------------------------------------------------------------------------------
def synthetic_inputs(model, arch: str | ArchSpec, *, batch: int = 1, text_tokens: int = 64,
                     image_size: tuple[int, int] | None = None, seed: int = 0) -> dict:
    """Forward kwargs for ``batch`` identical rows (no padding): one image per row (the family's adapter draws it:
    ``adapter.dummy_inputs``), ``text_tokens`` text tokens around it (half before, half after; tokens of the
    image's run that are not visual, Qwen's vision start / end, count as text)."""
    spec = get_arch(arch)
    adapter = get_adapter(model)
    size = image_size or spec.image_size
    run, _ = adapter.dummy_images(1, size, torch.Generator().manual_seed(0))
    n_text = max(2, int(text_tokens) - sum(t != adapter.placeholder_token_id() for t in run[0]))
    g = torch.Generator().manual_seed(seed)
    lo, hi = spec.text_ids
    text = torch.randint(lo, hi, (n_text,), generator=g)
    if spec.bos is not None:
        text[0] = spec.bos
    pre = n_text // 2
    texts = [(text[:pre].tolist(), text[pre:].tolist())] * batch
    return adapter.dummy_inputs(texts, image_size=size, generator=g)
