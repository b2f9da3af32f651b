"""What a vision-language model directory says: the image placeholder token, embedding rows per image, the
image preprocessing, and where its language and vision weights live.

Supported family: LLaVA-style checkpoints (`LlavaForConditionalGeneration`): a CLIP or SigLIP vision tower,
one feature layer, a linear-act-linear projector, and a Llama / Mistral / Qwen2 language model with plain
1-D RoPE. Every image becomes a fixed number of embedding rows that replace the image's placeholder tokens.
Not supported: LLaVA-NeXT "anyres" tiling, Qwen2-VL / Qwen2.5-VL (M-RoPE and dynamic resolution), multi-layer
feature concatenation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

VLM_ARCHITECTURES = ("LlavaForConditionalGeneration",)
VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
TEXT_TYPES = ("llama", "mistral", "qwen2")


class VLMConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ImageProcessorSpec:
    """CLIP style (resize the shortest edge, center crop) or SigLIP style (resize to height x width)."""

    resize_shortest_edge: int | None  # CLIP
    resize_hw: tuple[int, int] | None  # SigLIP
    crop_hw: tuple[int, int] | None
    resample: int  # PIL resample filter (3 = bicubic)
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def output_hw(self) -> tuple[int, int]:
        if self.crop_hw:
            return self.crop_hw
        if self.resize_hw:
            return self.resize_hw
        raise VLMConfigError("image processor gives no fixed output size")

    @classmethod
    def from_dict(cls, d: dict, default_size: int) -> "ImageProcessorSpec":
        size = d.get("size") or {}
        crop = d.get("crop_size") or {}
        shortest = size.get("shortest_edge") if isinstance(size, dict) else size
        hw = (size["height"], size["width"]) if isinstance(size, dict) and "height" in size else None
        if not d.get("do_resize", True):
            shortest, hw = None, None
        elif shortest is None and hw is None:
            shortest = default_size
        crop_hw = None
        if d.get("do_center_crop", shortest is not None):
            c = crop if isinstance(crop, dict) and crop else {"height": default_size, "width": default_size}
            crop_hw = (int(c.get("height", default_size)), int(c.get("width", default_size)))
        mean = tuple(d.get("image_mean") or (0.5, 0.5, 0.5)) if d.get("do_normalize", True) else (0.0, 0.0, 0.0)
        std = tuple(d.get("image_std") or (0.5, 0.5, 0.5)) if d.get("do_normalize", True) else (1.0, 1.0, 1.0)
        return cls(
            resize_shortest_edge=int(shortest) if shortest else None, resize_hw=hw, crop_hw=crop_hw,
            resample=int(d.get("resample", 3)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else 1.0,
            mean=mean, std=std,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class VLMSpec:
    hf_dir: str
    image_token_id: int
    image_token: str | None  # its text form (for chat templates), when the tokenizer knows it
    tokens_per_image: int
    text_hidden_size: int
    vision_config: dict
    vision_feature_layer: int
    select_strategy: str  # default: drop the CLS row | full
    projector_act: str
    processor: ImageProcessorSpec

    @classmethod
    def from_dir(cls, hf_dir: str) -> "VLMSpec | None":
        """None for a text-only model; raises VLMConfigError for an unsupported vision-language model."""
        with open(os.path.join(hf_dir, "config.json")) as f:
            cfg = json.load(f)
        if "vision_config" not in cfg:
            return None
        archs = cfg.get("architectures") or []
        if not any(a in VLM_ARCHITECTURES for a in archs):
            raise VLMConfigError(f"unsupported vision-language architecture {archs}; supported: {VLM_ARCHITECTURES}")
        v, t = cfg["vision_config"], cfg.get("text_config") or {}
        if v.get("model_type") not in VISION_TYPES:
            raise VLMConfigError(f"unsupported vision tower {v.get('model_type')!r}; supported: {VISION_TYPES}")
        if t.get("model_type", "llama") not in TEXT_TYPES:
            raise VLMConfigError(f"unsupported language model {t.get('model_type')!r}; supported: {TEXT_TYPES}")
        layer = cfg.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise VLMConfigError("multi-layer vision features (vision_feature_layer as a list) are not supported")
        strategy = cfg.get("vision_feature_select_strategy", "default")
        image_size, patch = int(v.get("image_size", 224)), int(v.get("patch_size", 14))
        cls_row = 1 if v["model_type"] == "clip_vision_model" else 0
        n = (image_size // patch) ** 2 + cls_row - (1 if strategy == "default" else 0)
        proc_path = os.path.join(hf_dir, "preprocessor_config.json")
        proc = {}
        if os.path.isfile(proc_path):
            with open(proc_path) as f:
                proc = json.load(f)
        token_id = int(cfg.get("image_token_index", cfg.get("image_token_id", 32000)))
        return cls(
            hf_dir=hf_dir, image_token_id=token_id, image_token=_token_text(hf_dir, token_id), tokens_per_image=n,
            text_hidden_size=int(t["hidden_size"]), vision_config=v, vision_feature_layer=layer,
            select_strategy=strategy, projector_act=cfg.get("projector_hidden_act", "gelu"),
            processor=ImageProcessorSpec.from_dict(proc, image_size),
        )


def _token_text(hf_dir: str, token_id: int) -> str | None:
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tj = json.load(f)
    for t in tj.get("added_tokens", []):
        if t.get("id") == token_id:
            return t.get("content")
    return None


def text_config_of(cfg: dict) -> dict:
    """The language model's config: the nested text_config of a VLM, else the config itself."""
    if "text_config" in cfg and "vision_config" in cfg:
        t = dict(cfg["text_config"])
        t.setdefault("model_type", "llama")
        if "tie_word_embeddings" not in t and "tie_word_embeddings" in cfg:
            t["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        return t
    return cfg


# Checkpoint key prefixes: llava-hf (original) and transformers >= 4.52 layouts.
LM_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
               ("language_model.lm_head.", "lm_head."))
VISION_PREFIXES = ("vision_tower.", "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def language_weight_name(name: str) -> str | None:
    """Map a VLM checkpoint key to the plain causal-LM key (model.layers..., lm_head...); None if not LM."""
    for src, dst in LM_PREFIXES:
        if name.startswith(src):
            return dst + name[len(src):]
    if name.startswith(VISION_PREFIXES) or name.startswith(PROJECTOR_PREFIXES):
        return None
    return name  # lm_head.weight, or a plain causal LM
