"""Tiny random-initialised models of the architectures the partitioner must handle."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

HIDDEN, LAYERS, FFN, VOCAB = 128, 3, 256, 512

CONFIGS = {
    "llama": (LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                          num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"]),
              "model.layers", "self_attn.q_proj"),
    "qwen2": (Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                          num_attention_heads=4, num_key_value_heads=2, architectures=["Qwen2ForCausalLM"]),
              "model.layers", "mlp.gate_proj"),
    "mistral": (MistralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                              num_attention_heads=4, num_key_value_heads=2, architectures=["MistralForCausalLM"]),
                "model.layers", "self_attn.o_proj"),
    "opt": (OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=4, word_embed_proj_dim=HIDDEN, architectures=["OPTForCausalLM"]),
            "model.decoder.layers", "fc1"),
    "gpt2": (GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_inner=FFN,
                        architectures=["GPT2LMHeadModel"]),
             "transformer.h", "attn.c_attn"),
    "bert": (BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                        num_attention_heads=4, architectures=["BertModel"]),
             "encoder.layer", "attention.self.query"),
}


def save_random_model(kind: str, dest: Path, seed: int = 0) -> Path:
    """Random weights (seeded) saved as a Hugging Face folder with safetensors."""
    config = CONFIGS[kind][0]
    torch.manual_seed(seed)
    auto = AutoModel if kind == "bert" else AutoModelForCausalLM
    model = auto.from_config(config)
    model.save_pretrained(dest)
    return dest
