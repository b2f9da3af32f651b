"""Vision tower + projector of a LLaVA-style checkpoint: pixel values -> embedding rows in the language
model's hidden size. Runs on encode servers, or inside a unified engine (and a prefill that is not
encoder-disaggregated).

The tower is transformers' own CLIPVisionModel / SiglipVisionModel (built from the checkpoint's
vision_config, weights loaded from its safetensors); the projector is Linear -> act -> Linear. Images are
encoded one at a time, so an image's embedding does not depend on which other images share its request or
encoder: unified and EPD deployments compute bit-identical rows.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from pdserve.epd.vlm import PROJECTOR_PREFIXES, VISION_PREFIXES, VLMSpec

logger = logging.getLogger(__name__)

_ACTS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
         "relu": F.relu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


def _load_prefixed(hf_dir: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(hf_dir)):
        if not f.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(hf_dir, f), "pt") as st:
            for k in st.keys():
                p = next((p for p in prefixes if k.startswith(p)), None)
                if p is not None:
                    out[k[len(p):]] = st.get_tensor(k)
    return out


class VisionEncoder:
    def __init__(self, spec: VLMSpec, dtype: torch.dtype, device: torch.device):
        from transformers import AutoConfig, AutoModel

        self.spec, self.dtype, self.device = spec, dtype, device
        vcfg = AutoConfig.for_model(**spec.vision_config)
        vcfg._attn_implementation = "sdpa"
        tower = AutoModel.from_config(vcfg)
        sd = _load_prefixed(spec.hf_dir, VISION_PREFIXES)
        expected = set(tower.state_dict())
        if sd and not (set(sd) & expected):  # checkpoints without the inner "vision_model." level
            sd = {f"vision_model.{k}": v for k, v in sd.items()}
        missing = [k for k in expected - set(sd) if not k.endswith("position_ids")]
        if missing:
            raise ValueError(f"vision tower weights missing from {spec.hf_dir}: {sorted(missing)[:5]}")
        tower.load_state_dict(sd, strict=False)
        self.tower = tower.to(device=device, dtype=dtype).eval()
        proj = _load_prefixed(spec.hf_dir, PROJECTOR_PREFIXES)
        try:
            self.w1, self.w2 = proj["linear_1.weight"].to(device, dtype), proj["linear_2.weight"].to(device, dtype)
        except KeyError:
            raise ValueError(f"projector weights (multi_modal_projector.linear_1/2) missing from {spec.hf_dir}") \
                from None
        self.b1 = proj.get("linear_1.bias")
        self.b2 = proj.get("linear_2.bias")
        self.b1 = None if self.b1 is None else self.b1.to(device, dtype)
        self.b2 = None if self.b2 is None else self.b2.to(device, dtype)
        if spec.projector_act not in _ACTS:
            raise ValueError(f"unsupported projector activation {spec.projector_act!r}")
        self.act = _ACTS[spec.projector_act]
        if self.w2.shape[0] != spec.text_hidden_size:
            raise ValueError(f"projector output {self.w2.shape[0]} != language hidden size {spec.text_hidden_size}")
        self.hidden_size = spec.text_hidden_size
        logger.info("vision encoder: %s, %d rows per image -> hidden %d", spec.vision_config.get("model_type"),
                    spec.tokens_per_image, self.hidden_size)

    @torch.inference_mode()
    def encode(self, pixel_values: np.ndarray) -> torch.Tensor:
        """[3, H, W] float32 -> [tokens_per_image, text_hidden] embeddings (on CPU, in the model dtype)."""
        x = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(self.device, self.dtype)[None]  # [1, 3, H, W]
        out = self.tower(pixel_values=x, output_hidden_states=True)
        feats = out.hidden_states[self.spec.vision_feature_layer]  # [1, 1 + P, Dv] (CLIP) or [1, P, Dv]
        if self.spec.select_strategy == "default":  # as transformers' Llava: drop the first (CLS) row
            feats = feats[:, 1:]
        h = F.linear(feats[0], self.w1, self.b1)  # [P, H]
        h = F.linear(self.act(h), self.w2, self.b2)  # [P, H]
        if h.shape[0] != self.spec.tokens_per_image:
            raise ValueError(f"vision tower produced {h.shape[0]} rows, the config says {self.spec.tokens_per_image}")
        return h.to("cpu").contiguous()
