"""The demo vision-language model: SmolLM2-135M-Instruct (real, trained language weights) joined to a small
CLIP-style vision tower and a 2-layer projector that are randomly initialised with a fixed seed.

**The vision weights are untrained**: images change the output deterministically, but the model does not
understand them. The directory is a genuine transformers `LlavaForConditionalGeneration` checkpoint, so
transformers itself can run it as a reference (tests do).

    from pdserve.epd.demo_vlm import build_demo_vlm
    path = build_demo_vlm()      # cached under $PDSERVE_CACHE_DIR/demo-vlm/<key>; deterministic

Shape: CLIP ViT (112x112 input, 14x14 patches -> 8x8 = 64 patch tokens + CLS, 4 layers, width 256),
features of the second-to-last layer without CLS -> Linear(256, 576) -> GELU -> Linear(576, 576): 64
embedding rows per image, each replacing one `<image>` placeholder token of the prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

from pdserve.envs import ENVS

logger = logging.getLogger(__name__)

BUILDER_VERSION = "1"  # bump when the recipe changes: a new cache key
SEED = 1234
IMAGE_TOKEN = "<image>"
VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=112,
              patch_size=14, projection_dim=256)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def demo_vlm_dir(base_hf_dir: str | None = None) -> str:
    """Where build_demo_vlm caches the model built on `base_hf_dir` (default: the default model)."""
    if base_hf_dir is None:
        from pdserve.model.loader import resolve_model

        base_hf_dir = resolve_model(None).hf_dir
    key = hashlib.sha256(f"{BUILDER_VERSION}|{SEED}|{json.dumps(VISION, sort_keys=True)}|"
                         f"{os.path.abspath(base_hf_dir)}".encode()).hexdigest()[:16]
    return os.path.join(ENVS.cache_dir, "demo-vlm", f"smollm2-clip-demo-{key}")


def build_demo_vlm(out_dir: str | None = None, base_hf_dir: str | None = None) -> str:
    """Build (once) and return the demo VLM directory. Idempotent and safe against concurrent builders:
    the model is written to a temporary directory and renamed into place."""
    out_dir = out_dir or demo_vlm_dir(base_hf_dir)
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    if base_hf_dir is None:
        from pdserve.model.loader import resolve_model

        base_hf_dir = resolve_model(None).hf_dir
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-demo-vlm-")
    try:
        _build(tmp, base_hf_dir)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(out_dir, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("demo VLM ready: %s", out_dir)
    return out_dir


def _build(path: str, base_hf_dir: str) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from pdserve.model.loader import load_tokenizer

    tok = load_tokenizer(base_hf_dir)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    with open(os.path.join(base_hf_dir, "config.json")) as f:
        base_cfg = json.load(f)
    for k in ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        base_cfg.pop(k, None)
    base_cfg["vocab_size"] = len(tok)
    text_config = AutoConfig.for_model(**base_cfg)
    n_patches = (VISION["image_size"] // VISION["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION), text_config=text_config, image_token_index=image_token_id,
        image_seq_length=n_patches, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=bool(base_cfg.get("tie_word_embeddings")),
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).float().eval()

    # The language model: SmolLM2's trained weights; the new <image> row of the embedding is zero (its
    # embedding is always replaced by an image row, and a zero row never wins the argmax against real logits).
    base = load_file(os.path.join(base_hf_dir, "model.safetensors"))
    lm = model.model.language_model
    with torch.no_grad():
        for name, t in base.items():
            if name == "lm_head.weight":
                model.lm_head.weight[: t.shape[0]].copy_(t)
                continue
            assert name.startswith("model."), name
            target = lm.get_parameter(name[len("model."):])
            if name == "model.embed_tokens.weight":
                target.zero_()
                target[: t.shape[0]].copy_(t)
            else:
                target.copy_(t)
        if not config.tie_word_embeddings and "lm_head.weight" not in base:
            model.lm_head.weight.copy_(lm.embed_tokens.weight)
        # Seeded vision tower and projector: scale the projector so image rows have the magnitude of token
        # embeddings (HF's default init makes them ~100x smaller, and then images barely change the output).
        gen = torch.Generator().manual_seed(SEED + 1)
        probe = torch.randn(1, 3, VISION["image_size"], VISION["image_size"], generator=gen)
        feats = model.model.get_image_features(pixel_values=probe, vision_feature_layer=-2,
                                               vision_feature_select_strategy="default")
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        emb_std = lm.embed_tokens.weight[:image_token_id].std()
        scale = float(emb_std / feats.float().std())
        proj = model.model.multi_modal_projector
        proj.linear_2.weight.mul_(scale)
        proj.linear_2.bias.mul_(scale)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    for extra in ("generation_config.json", "chat_template.jinja"):
        src = os.path.join(base_hf_dir, extra)
        if os.path.isfile(src) and not os.path.isfile(os.path.join(path, extra)):
            shutil.copy(src, os.path.join(path, extra))
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({
            "image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": VISION["image_size"]}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": VISION["image_size"], "width": VISION["image_size"]}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "do_convert_rgb": True,
        }, f, indent=2)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("pdserve demo VLM: SmolLM2-135M-Instruct language weights + an UNTRAINED, seeded CLIP-style vision "
                f"tower and projector (seed {SEED}). Images change the output but are not understood.\n")
