"""An ordered-1D-token VLM as plain transformers classes (``model_type = "vtc_ordered_vlm"``).

The vision encoder turns an image into a short *ordered* 1D sequence of latent tokens, in the spirit of
TiTok (Yu et al. 2024, arXiv:2406.07550) and FlexTok (Bachmann et al. 2025, arXiv:2502.13967):

    pixels --CLIP ViT--> 196 patch (+CLS) features --resampler--> n_latents latents --projector--> LM

The resampler has ``n_latents`` learned queries; each of its blocks does cross-attention from the queries
to the patch features, *causal* self-attention among the queries (latent ``i`` sees latents ``<= i``) and an
MLP. It is trained with nested dropout: the language model sees only a random prefix of the latents, so
every prefix ``latents[:, :k]`` is a valid coarser description of the image and truncating the sequence
is the natural way to spend fewer visual tokens.

The layout mirrors ``LlavaForConditionalGeneration`` of transformers 5.24 so that tooling written for
LLaVA finds the same things:

- ``model.model.vision_tower`` (:class:`OrderedVisionTower`), ``model.model.multi_modal_projector``,
  ``model.model.language_model`` (a ``LlamaModel``), ``model.lm_head``, ``config.image_token_id``;
- ``get_image_features(pixel_values)`` returns a ``BaseModelOutputWithPooling`` whose ``last_hidden_state``
  is the (B, n_latents, D_vision) latents and whose ``pooler_output`` is the projected features, a list of
  B tensors of shape (n_latents, D_text), exactly like LLaVA's; ``image_features(pixel_values)`` gives
  them as one (B, n_latents, D_text) tensor;
- ``forward`` scatters the features into the ``<image>`` placeholder positions like ``LlavaModel``
  (so a shorter feature sequence needs equally fewer placeholders) and works with ``generate``.

Call :func:`register` once (idempotent) to make ``AutoConfig`` / ``AutoModel`` /
``AutoModelForImageTextToText`` know the model type.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers.utils.deprecation import deprecate_kwarg

# transformers 5.17 - 5.19 lack ``SubConfigSpec``, the ``Multimodal*OutputWithPast`` classes and the ``cache``
# keyword (they call it ``past_key_values``); the fallbacks below give the same model there. Detected by feature,
# never by version number.
try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.2x: ``sub_configs = {name: AutoConfig}`` plus a ``__post_init__``
    SubConfigSpec = None

# "cache" where the transformers base outputs (and so LlamaModel and generate) use the new name
CACHE_KW = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_keyword(forward):
    """``forward`` (whose cache parameter is named ``cache``) with the cache keyword of this transformers: ``cache``
    (``past_key_values`` accepted with a deprecation warning, as transformers' own models do), or ``past_key_values``
    before 5.2x. generate reads the name off the signature, so the signature says it too."""
    if CACHE_KW == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)
    sig = inspect.signature(forward)
    params = [p.replace(name=CACHE_KW) if p.name == "cache" else p for p in sig.parameters.values()]

    @functools.wraps(forward)
    def renamed(self, *args, **kwargs):
        if CACHE_KW in kwargs:
            kwargs["cache"] = kwargs.pop(CACHE_KW)
        return forward(self, *args, **kwargs)

    renamed.__signature__ = sig.replace(parameters=params)
    return renamed

try:
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast, MultimodalCausalLMOutputWithPast
except ImportError:  # transformers < 5.2x: the same fields, under the cache name of that version
    from dataclasses import dataclass

    from transformers.utils import ModelOutput

    @dataclass
    class MultimodalBaseModelOutputWithPast(BaseModelOutputWithPast):
        """``BaseModelOutputWithPast`` plus the encoders' outputs (``image_outputs`` is the one this model fills)."""

        image_outputs: BaseModelOutputWithPooling | None = None
        video_outputs: BaseModelOutputWithPooling | None = None
        audio_outputs: BaseModelOutputWithPooling | None = None

    @dataclass
    class MultimodalCausalLMOutputWithPast(ModelOutput):
        """Causal-LM output (loss, logits, past_key_values, hidden_states, attentions) plus the encoders' outputs."""

        loss: torch.FloatTensor | None = None
        logits: torch.FloatTensor | None = None
        past_key_values: Cache | None = None
        hidden_states: tuple[torch.FloatTensor, ...] | None = None
        attentions: tuple[torch.FloatTensor, ...] | None = None
        image_outputs: BaseModelOutputWithPooling | None = None
        video_outputs: BaseModelOutputWithPooling | None = None
        audio_outputs: BaseModelOutputWithPooling | None = None

__all__ = [
    "OrderedVLMConfig",
    "OrderedVisionTower",
    "OrderedVLMModel",
    "OrderedVLMForConditionalGeneration",
    "register",
]

MODEL_TYPE = "vtc_ordered_vlm"


class OrderedVLMConfig(PreTrainedConfig):
    """Config of the ordered-1D-token VLM: a CLIP vision config, a Llama text config and the resampler."""

    model_type = MODEL_TYPE
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
            "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        }
    else:
        sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 4
    n_latents: int = 32
    resampler_layers: int = 2
    resampler_heads: int = 4
    resampler_position_bias: bool = False
    image_seq_length: int = 32
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False

    if SubConfigSpec is None:

        def __post_init__(self, **kwargs):
            """Older transformers: build the sub-configs from dicts (or defaults) as ``SubConfigSpec`` does."""
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            for key, default_type in (("vision_config", "clip_vision_model"), ("text_config", "llama")):
                value = getattr(self, key)
                if isinstance(value, dict):
                    value = CONFIG_MAPPING[value.get("model_type", default_type)](**value)
                elif value is None:
                    value = CONFIG_MAPPING[default_type]()
                setattr(self, key, value)
            super().__post_init__(**kwargs)


# ----------------------------------------------------------------------------------------- vision side
class _ResamplerBlock(nn.Module):
    """Queries: cross-attention to the patches, causal self-attention, MLP (all pre-norm, residual)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(dim, 2 * dim)
        self.cross_out = nn.Linear(dim, dim)
        self.norm_self = nn.LayerNorm(dim)
        self.self_qkv = nn.Linear(dim, 3 * dim)
        self.self_out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, q: torch.Tensor, feats: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias``: optional (heads, n_queries, n_keys) additive cross-attention bias."""
        kv = self.cross_kv(self.norm_kv(feats)).chunk(2, dim=-1)
        a = F.scaled_dot_product_attention(
            self._split(self.cross_q(self.norm_q(q))),
            self._split(kv[0]),
            self._split(kv[1]),
            attn_mask=None if bias is None else bias.to(q.dtype),
        )
        q = q + self.cross_out(self._merge(a))
        qq, kk, vv = (self._split(t) for t in self.self_qkv(self.norm_self(q)).chunk(3, dim=-1))
        q = q + self.self_out(self._merge(F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)))
        return q + self.fc2(F.gelu(self.fc1(self.norm_mlp(q))))


class OrderedVisionTower(nn.Module):
    """CLIP ViT over patches, then ``n_latents`` learned queries resample it into an ordered 1D sequence.

    ``forward(pixel_values)`` returns ``BaseModelOutputWithPooling`` with ``last_hidden_state`` the
    (B, n_latents, D) latents and ``pooler_output`` the CLIP CLS embedding (B, D).

    With ``config.resampler_position_bias`` every cross-attention has a learned additive bias per (layer, head,
    query, key), zero at init: a query can prefer an image region regardless of content, which content-only
    attention of a learned query reaches slowly (a spatial prior, like the relative-position biases of
    Swin-style attention, applied to the query-to-patch map).
    """

    def __init__(self, config: OrderedVLMConfig):
        super().__init__()
        vc = config.vision_config
        self.encoder = AutoModel.from_config(vc)  # CLIPVisionModel
        dim = vc.hidden_size
        self.queries = nn.Parameter(torch.randn(config.n_latents, dim) * 0.02)
        self.layers = nn.ModuleList(
            [_ResamplerBlock(dim, config.resampler_heads) for _ in range(config.resampler_layers)]
        )
        self.norm = nn.LayerNorm(dim)
        self.position_bias = None
        if config.resampler_position_bias:
            n_keys = (vc.image_size // vc.patch_size) ** 2 + 1  # patches and CLS
            self.position_bias = nn.Parameter(
                torch.zeros(config.resampler_layers, config.resampler_heads, config.n_latents, n_keys)
            )

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        enc = self.encoder(pixel_values, return_dict=True)
        return BaseModelOutputWithPooling(
            last_hidden_state=self.resample(enc.last_hidden_state), pooler_output=enc.pooler_output
        )

    def resample(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, 1 + n_patches, D) CLIP outputs (CLS first) -> (B, n_latents, D) ordered latents."""
        q = self.queries.unsqueeze(0).expand(feats.shape[0], -1, -1).to(feats.dtype)
        for i, layer in enumerate(self.layers):
            q = layer(q, feats, None if self.position_bias is None else self.position_bias[i])
        return self.norm(q)


class OrderedVLMMultiModalProjector(nn.Module):
    """Same two-layer MLP as ``LlavaMultiModalProjector``."""

    def __init__(self, config: OrderedVLMConfig):
        super().__init__()
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


# ------------------------------------------------------------------------------------------- the VLM
class OrderedVLMPreTrainedModel(PreTrainedModel):
    config_class = OrderedVLMConfig
    config: OrderedVLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, OrderedVisionTower):
            module.queries.normal_(0.0, 0.02)
            if module.position_bias is not None:
                module.position_bias.zero_()


class OrderedVLMModel(OrderedVLMPreTrainedModel):
    def __init__(self, config: OrderedVLMConfig):
        super().__init__(config)
        self.vision_tower = OrderedVisionTower(config)
        self.multi_modal_projector = OrderedVLMMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)  # LlamaModel
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Latents of the vision tower, projected; ``pooler_output`` is a list of (n_latents, D_text)."""
        image_outputs = self.vision_tower(pixel_values)
        image_features = self.multi_modal_projector(image_outputs.last_hidden_state)
        image_outputs.pooler_output = list(image_features)
        return image_outputs

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        if input_ids is None:
            special_image_mask = inputs_embeds == self.get_input_embeddings()(
                torch.full((), self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            special_image_mask = special_image_mask.all(-1)
        else:
            special_image_mask = input_ids == self.config.image_token_id
        n_image_tokens = int(special_image_mask.sum())
        if n_image_tokens * inputs_embeds.shape[-1] != image_features.numel():
            raise ValueError(
                f"Image features and image tokens do not match, tokens: {n_image_tokens}, "
                f"features: {image_features.shape[0]}"
            )
        return special_image_mask.unsqueeze(-1).to(inputs_embeds.device)

    @_cache_keyword
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> MultimodalBaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        kwargs.pop("return_dict", None)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        mm_encoder_outputs = mm_encoder_outputs if mm_encoder_outputs is not None else {}
        if mm_encoder_outputs.get("image") is None and pixel_values is not None:
            mm_encoder_outputs["image"] = self.get_image_features(pixel_values=pixel_values)

        if mm_encoder_outputs.get("image") is not None:
            feats = mm_encoder_outputs["image"].pooler_output
            feats = torch.cat(list(feats), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=feats)
            inputs_embeds = inputs_embeds.masked_scatter(mask, feats)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **{CACHE_KW: cache},
            **kwargs,
        )
        return MultimodalBaseModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_KW: getattr(outputs, CACHE_KW)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=mm_encoder_outputs.get("image"),
        )


def _lm_signature(model_forward) -> inspect.Signature:
    """The causal LM's ``forward`` signature: the base model's (its cache keyword included) with ``labels`` and
    ``logits_to_keep`` before ``mm_encoder_outputs``, in the order of transformers' own models."""
    params = list(inspect.signature(model_forward).parameters.values())
    at = [p.name for p in params].index("mm_encoder_outputs")
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    extra = [inspect.Parameter("labels", kind, default=None, annotation="torch.LongTensor | None"),
             inspect.Parameter("logits_to_keep", kind, default=0, annotation="int | torch.Tensor")]
    return inspect.Signature(params[:at] + extra + params[at:], return_annotation="MultimodalCausalLMOutputWithPast")


_LM_SIGNATURE = _lm_signature(OrderedVLMModel.forward)


class OrderedVLMForConditionalGeneration(OrderedVLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: OrderedVLMConfig):
        super().__init__(config)
        self.model = OrderedVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected ordered latents as one (B, n_latents, D_text) tensor."""
        return torch.stack(self.get_image_features(pixel_values).pooler_output, dim=0)

    def forward(self, *args, **kwargs) -> MultimodalCausalLMOutputWithPast:
        """:meth:`OrderedVLMModel.forward`'s inputs (passed on to it as given), plus ``labels`` (for a loss) and
        ``logits_to_keep``; the signature (:data:`_LM_SIGNATURE`) names them all, as generate reads it."""
        inputs = _LM_SIGNATURE.bind(self, *args, **kwargs).arguments
        del inputs["self"]
        labels = inputs.pop("labels", None)
        logits_to_keep = inputs.pop("logits_to_keep", 0)
        kwargs = inputs.pop("kwargs", {})
        outputs = self.model(**inputs, **kwargs)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_KW: getattr(outputs, CACHE_KW)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )

    forward.__signature__ = _LM_SIGNATURE


def register() -> None:
    """Register the model type with the transformers Auto classes (safe to call many times)."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, OrderedVLMConfig, exist_ok=True)
    AutoModel.register(OrderedVLMConfig, OrderedVLMModel, exist_ok=True)
    AutoModelForImageTextToText.register(OrderedVLMConfig, OrderedVLMForConditionalGeneration, exist_ok=True)
