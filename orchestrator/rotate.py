"""Rotation of the residual stream before quantization (QuaRot / SpinQuant's fusable rotation R1).

For an orthogonal Q [d, d] (Q Q^T = I), a Llama-family model computes the same
function when every residual-stream vector x is replaced by x Q, because RMSNorm
without its scale commutes with Q (||x Q|| = ||x||). Its weights then change as:

- each RMSNorm's scale gamma is first folded into the Linear layers that read
  the norm's output (W <- W diag(gamma)), and set to 1;
- layers reading the residual stream (q/k/v, gate/up, lm_head) W [out, d] <- W Q;
- layers writing to it (o_proj, down_proj) W [d, in] <- Q^T W (a bias b <- b Q);
- the embedding E [vocab, d] <- E Q.

Outliers of single channels are spread over all channels, so groups quantize
with finer steps. The result is a checkpoint of the same architecture with
norm scales of 1; a tied lm_head becomes untied (it carries the final norm's
scale, the embedding does not), which costs one vocab x d matrix on disk.

Q = diag(random signs) H / sqrt(d): H the Sylvester Hadamard matrix when d is a
power of two, else kron(H_{2^k}, R_m) with R_m a seeded random orthogonal matrix
for the odd factor m of d (576 = 64 x 9). Computed in float64, stored in the
checkpoint's dtype. Tensors are rotated one at a time (memory: one tensor).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orchestrator.checkpoint import INDEX_NAME, copy_non_weight_files, write_index
from orchestrator.errors import UserError
from orchestrator.partition import checkpoint_files



FAMILIES = ("llama", "mistral", "qwen2")  # RMSNorm(x) * gamma before every block input, no norm after
ROTATION_VERSION = 1  # part of the cache key: bump when the rotated bytes change
READERS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
           "mlp.gate_proj.weight", "mlp.up_proj.weight")  # read the residual stream after a norm
NORM_OF = {"self_attn": "input_layernorm.weight", "mlp": "post_attention_layernorm.weight"}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")  # add to the residual stream
UNCHANGED = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "rotary_emb.inv_freq")


def check_rotatable(config: dict) -> None:
    """UserError unless the model is of a family whose norms and layers the rotation knows."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"rotation.enabled: the rotation knows the {', '.join(FAMILIES)} families; this model is "
                        f"{family!r} ({', '.join(config.get('architectures') or [])})")


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix [n, n] of +-1, n a power of two."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def rotation_matrix(d: int, seed: int) -> torch.Tensor:
    """An orthogonal Q [d, d] float64: random signs times a (Kronecker-extended) normalised Hadamard matrix."""
    gen = torch.Generator().manual_seed(seed)
    power = d & -d  # the largest power of two dividing d
    odd = d // power
    H = hadamard(power) / power ** 0.5
    if odd > 1:
        R, _ = torch.linalg.qr(torch.randn(odd, odd, generator=gen, dtype=torch.float64))
        H = torch.kron(H, R.contiguous())
    signs = torch.randint(0, 2, (d,), generator=gen, dtype=torch.float64) * 2 - 1
    return signs[:, None] * H


def rotate_tensor(name: str, W: torch.Tensor, Q: torch.Tensor, norm_scale) -> torch.Tensor:
    """One tensor of the rotated checkpoint; norm_scale(key) reads a norm's gamma [d] (float64)."""
    dtype = W.dtype
    W64 = W.double()
    if name == "model.embed_tokens.weight":
        out = W64 @ Q
    elif name == "lm_head.weight":
        out = (W64 * norm_scale("model.norm.weight")) @ Q
    elif name.endswith("norm.weight"):
        out = torch.ones_like(W64)
    elif name.startswith("model.layers."):
        parts = name.split(".")
        prefix, local = ".".join(parts[:3]) + ".", ".".join(parts[3:])  # 'model.layers.3.', 'mlp.up_proj.weight'
        if local in READERS:
            out = (W64 * norm_scale(prefix + NORM_OF[local.split(".")[0]])) @ Q
        elif local.removesuffix(".weight") in WRITERS:
            out = Q.T @ W64
        elif local.removesuffix(".bias") in WRITERS:
            out = W64 @ Q
        elif local in UNCHANGED:
            return W
        else:
            raise UserError(f"rotation.enabled: does not know how to rotate {name}; rotation works on "
                            f"{', '.join(FAMILIES)} checkpoints with their usual layers")
    else:
        return W
    return out.to(dtype).contiguous()


def rotate_checkpoint(src: Path, dest: Path, seed: int) -> dict:
    """dest: src with its residual stream rotated (same architecture, untied lm_head). -> rotation.json's data."""
    config = json.loads((src / "config.json").read_text())
    check_rotatable(config)
    Q = rotation_matrix(config["hidden_size"], seed)
    index = src / INDEX_NAME
    weight_map = checkpoint_files(src)  # key -> file

    def read(key: str) -> torch.Tensor:
        with safe_open(src / weight_map[key], framework="pt") as f:
            return f.get_tensor(key)

    @functools.cache
    def norm_scale(key: str) -> torch.Tensor:  # each norm is read once, though 2-3 layers fold it
        return read(key).double()

    dest.mkdir(parents=True, exist_ok=True)
    new_map, total = {}, 0
    files = sorted(set(weight_map.values()))
    for fname in files:
        tensors = {k: rotate_tensor(k, read(k), Q, norm_scale) for k in sorted(weight_map) if weight_map[k] == fname}
        if "lm_head.weight" not in weight_map and "model.embed_tokens.weight" in tensors:  # tied: untie
            tensors["lm_head.weight"] = rotate_tensor("lm_head.weight", read("model.embed_tokens.weight"), Q,
                                                      norm_scale)
        save_file(tensors, str(dest / fname), metadata={"format": "pt"})
        new_map.update({k: fname for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    copy_non_weight_files(src, dest)
    config["tie_word_embeddings"] = False
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if index.is_file():
        write_index(dest, new_map, total)
    info = {"seed": seed, "hidden_size": config["hidden_size"], "version": ROTATION_VERSION,
            "untied_lm_head": "lm_head.weight" not in weight_map, "source": str(src),
            "q_sha256": hashlib.sha256(Q.numpy().tobytes()).hexdigest()}
    (dest / "rotation.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def rotated_model(model_dir: Path, seed: int, progress: bool) -> Path:
    """The rotated copy of model_dir, built once into the cache (keyed by the model's fingerprint and seed)."""
    from orchestrator.reference import cached_build
    from orchestrator.store import model_fingerprint

    check_rotatable(json.loads((model_dir / "config.json").read_text()))
    key = hashlib.sha256(f"{model_fingerprint(model_dir)}:{seed}:{ROTATION_VERSION}".encode()).hexdigest()[:12]
    return cached_build(model_dir.name, key, lambda _name, dest, _progress: rotate_checkpoint(model_dir, dest, seed),
                        progress, kind="rotated")
