"""Tiny random-initialised models of the architectures the partitioner must handle."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    DeepseekV3Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen2MoeConfig,
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


def save_random_norms_model(kind: str, dest: Path, tied: bool = False, hidden: int | None = None,
                            kv_heads: int | None = None) -> Path:
    """A random causal LM (seed 0) whose norm scales and biases are random too (zero or one at
    initialisation, so a fold into them would go untested); optionally tied, of another hidden size, or
    with another number of key/value heads."""
    config = copy.deepcopy(CONFIGS[kind][0])
    config.tie_word_embeddings = tied
    config.hidden_size = hidden or config.hidden_size
    config.num_key_value_heads = kv_heads or config.num_key_value_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) * 2 + 0.1)
            elif name.endswith("bias"):
                p.normal_()
    model.save_pretrained(dest)
    return dest


# Mixture-of-experts families as transformers 5 saves them (one tensor per expert and projection on disk,
# fused [E, 2I, H] / [E, H, I] parameters in memory): Mixtral (experts only), Qwen2-MoE (with a shared
# expert and its gate), DeepSeek-V3 (a dense first block, a shared expert, grouped routing with a bias)
MOE_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, max_position_embeddings=512)
MOE_CONFIGS = {
    "mixtral": MixtralConfig(intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=4,
                             num_experts_per_tok=2, architectures=["MixtralForCausalLM"], **MOE_COMMON),
    "qwen2_moe": Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                                num_hidden_layers=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                architectures=["Qwen2MoeForCausalLM"], **MOE_COMMON),
    "deepseek_v3": DeepseekV3Config(intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=3,
                                    first_k_dense_replace=1, num_key_value_heads=4, n_routed_experts=12,
                                    num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=32,
                                    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                    architectures=["DeepseekV3ForCausalLM"], **MOE_COMMON),
}
MOE_BLOCKS = {"mixtral": [0, 1], "qwen2_moe": [0, 1], "deepseek_v3": [1, 2]}  # the blocks holding experts
NUM_EXPERTS = {"mixtral": 4, "qwen2_moe": 4, "deepseek_v3": 12}  # 12: experts 10, 11 sort after 9


def save_wide_llama(dest: Path, tokenizer_dir: Path, width: int) -> Path:
    """A random 2-block Llama (seed 0) whose every Linear input is `width` wide, with micro-lm's tokenizer."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=width, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, dest / name)
    return dest


def save_random_moe(kind: str, dest: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random MoE checkpoint saved by transformers itself, with micro-lm's tokenizer (same 512 ids)."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(MOE_CONFIGS[kind]).save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, dest / name)
    return dest
