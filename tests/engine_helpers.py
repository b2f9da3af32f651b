"""Shared bits for engine-level tests: prompts, reference generation with transformers, tiny models."""

from __future__ import annotations

import json
import os

import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,",
    "Translate to French: I love reading books.",
    "The three primary colors are",
    "import numpy as np\nx = np.array([1, 2, 3])\nprint(",
    "Q: What is the boiling point of water in Celsius?\nA:",
    "日本の首都は",
]


def hf_greedy(hf_model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' own greedy generate(); returns new token ids and first-step logprobs [V]."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
        first_logits = hf_model(ids).logits[0, -1].float()
    return out.sequences[0, ids.shape[1]:].tolist(), torch.log_softmax(first_logits, -1)


def build_tiny_model(path: str, model_type: str = "qwen2", seed: int = 0, num_heads: int = 4,
                     num_kv_heads: int = 2, num_layers: int = 2) -> str:
    """A tiny randomly initialised model dir (config + safetensors + tokenizer copied from the default)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pdserve.model.loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(None).hf_dir)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                               max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # make q/k/v biases non-zero so the bias path is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["architectures"]
    return path
