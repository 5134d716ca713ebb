"""Export: the compressed checkpoint in the compressed-tensors format.

Each worker writes its shard twice: as it will be computed with (every weight
on its integer grid, in the model's dtype: the checkpoint the run evaluates)
and packed with the compressed-tensors library (the export). So the export
streams shard by shard across the workers, and the driver only adds the
index, the config and the manifest. The packed layout:

- quantized Linear layers, one config group per (bits, group size, symmetric)
  scheme: symmetric grids as pack-quantized (the format the library infers for
  integer weight-only schemes: `weight_packed` int32 words holding 32 / bits
  integers each, `weight_scale`, `weight_shape`); asymmetric grids as
  naive-quantized (`weight` int8, `weight_scale`, `weight_zero_point`), because
  compressed-tensors 0.20.x cannot load its own packed zero points: when
  transformers builds the compressed layout on the meta device the library
  leaves `weight_zero_point` unpacked ([out, groups]) while `compress` writes
  it packed ([out * bits / 32, groups]), so the load fails with a size mismatch;
- every other tensor (embeddings, norms, head, pruned-only layers, layers the
  recipe leaves alone) is copied in its dense dtype; the Linear modules among
  them are listed in `ignore`;
- `config.json` gets the library's `quantization_config`.

Every packed layer is unpacked again with the library and compared with the
weight the run evaluated: an export that would not reproduce it raises.

Before a run reports success it proves the export loads (`check_loads`): a
slice of it (its first block, or up to the first block with experts) is loaded
with transformers' from_pretrained, in a fresh process, and must give the
logits of the same slice of the evaluated copy.
Some families cannot load a packed layer at all (Falcon's `_init_weights` reads
`FalconLinear.weight`, which pack-quantized layers lack); such a run fails
rather than deliver a checkpoint nobody can open.

Sparsity is stored as explicit zeros. compressed-tensors 0.20 (the version
transformers 5.23 requires, >= 0.15) removed its sparse compressors (bitmask,
2:4): `sparse-bitmask` / `sparse-24-bitmask` remain only as legacy config names
and `ModelCompressor.update_config` writes an empty `sparsity_config`.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from compressed_tensors import __version__ as ct_version
from safetensors.torch import save_file
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from orchestrator.checkpoint import INDEX_NAME, copy_non_weight_files, file_sha256, read_keys, write_index
from orchestrator.techniques.grid import QuantParams

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors config group: the grid a set of layers was quantized on."""

    bits: int
    group_size: int  # -1: one scale per output channel
    symmetric: bool

    @property
    def format(self) -> CompressionFormat:
        return CompressionFormat.pack_quantized if self.symmetric else CompressionFormat.naive_quantized

    def args(self) -> QuantizationArgs:
        per_channel = self.group_size == -1
        return QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric,
                                strategy="channel" if per_channel else "group",
                                group_size=None if per_channel else self.group_size)


@dataclass(frozen=True)
class QuantizedLayer:
    module: str  # module name in the loaded model (what `targets` / `ignore` match)
    weight_key: str  # the dense weight's checkpoint key; its module prefix names the packed tensors
    scheme: Scheme


def scheme_of(quant: QuantParams, in_features: int) -> Scheme:
    return Scheme(quant.bits, -1 if quant.group_size == in_features else quant.group_size, quant.symmetric)


def pack_layer(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme,
                   name: str) -> dict[str, torch.Tensor]:
    """W [out, in] (on the grid, model dtype) -> the library's compressed tensors (local names).

    Raises if unpacking them does not give back W exactly.
    """
    qscheme = QuantizationScheme(targets=["Linear"], weights=scheme.args(), format=scheme.format.value)
    compressor = BaseCompressor.get_value_from_registry(scheme.format.value)
    state = {"weight": W.float(), "weight_scale": scale, "weight_zero_point": zero.to(torch.int8)}
    packed = compressor.compress(state, qscheme)
    packed["weight_scale"] = packed["weight_scale"].to(W.dtype)  # what a loader casts it to
    back = compressor.decompress(dict(packed), qscheme)["weight"].to(W.dtype)
    if not torch.equal(back, W):
        worst = (back.float() - W.float()).abs().max().item()
        raise RuntimeError(f"export: {name} does not survive packing (max difference {worst:g}); "
                           "its weights are not on the grid its scales describe")
    return packed


def linear_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def quantization_config(layers: list[QuantizedLayer], all_linears: list[str], in_features: dict[str, int]) -> dict:
    """config.json's quantization_config, built and serialised by the library.

    A layer quantized per channel whose width equals the group size of another layer's scheme (same bits,
    same symmetry) is listed in that scheme: one group per row is one scale per channel, packed to the
    same tensors. So groups of 128 on a model with 128-wide layers stay one scheme, targeting `Linear`,
    which is also the only form that reaches the experts of a mixture-of-experts model (they are no
    modules of their own in transformers, so a list of names cannot)."""
    schemes = {layer.scheme for layer in layers}
    by_scheme: dict[Scheme, list[str]] = defaultdict(list)
    for layer in layers:
        s = layer.scheme
        twin = Scheme(s.bits, in_features[layer.module], s.symmetric) if s.group_size == -1 else None
        by_scheme[twin if twin in schemes else s].append(layer.module)
    quantized = {layer.module for layer in layers}
    ignore = [name for name in all_linears if name not in quantized]
    groups = {}
    for i, (scheme, modules) in enumerate(sorted(by_scheme.items(), key=lambda kv: kv[1][0])):
        # one scheme for everything: the usual `Linear` target; several: the exact module names
        targets = ["Linear"] if len(by_scheme) == 1 else sorted(modules)
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=scheme.args(), format=scheme.format.value)
    formats = {scheme.format for scheme in by_scheme}
    config = QuantizationConfig(config_groups=groups, ignore=ignore, quantization_status=QuantizationStatus.COMPRESSED,
                                format=formats.pop().value if len(formats) == 1 else CompressionFormat.mixed_precision.value)
    data = config.model_dump(exclude=["quant_method"])
    return {"version": ct_version, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **data}


def pack_shard(tensors: dict[str, torch.Tensor], layers: list[QuantizedLayer],
               grids: dict[str, QuantParams]) -> tuple[dict[str, torch.Tensor], int]:
    """A shard's tensors (as evaluated) -> the same in compressed-tensors layout, and the bytes of the
    packed layers. `grids` holds each quantized layer's scales and zeros, by module name."""
    out = dict(tensors)
    packed_bytes = 0
    for layer in layers:
        W = out.pop(layer.weight_key)
        grid = grids[layer.module]
        packed = pack_layer(W, grid.scale.float(), grid.zero, layer.scheme, layer.module)
        prefix = layer.weight_key.removesuffix(".weight")
        out.update({f"{prefix}.{local}": t for local, t in packed.items()})
        packed_bytes += sum(t.numel() * t.element_size() for t in packed.values())
    return out, packed_bytes


def finish_export(dense_dir: Path, out_dir: Path, weight_map: dict[str, str], tensor_bytes: int,
                  layers: list[QuantizedLayer], all_linears: list[str], in_features: dict[str, int]) -> str:
    """The packed files are in out_dir (the workers wrote them): add the index, the config (with the
    quantization_config), tokenizer and recipe from dense_dir, and the manifest. -> the format."""
    write_index(out_dir, weight_map, tensor_bytes)
    copy_non_weight_files(dense_dir, out_dir)
    fmt = "dense safetensors"
    if layers:
        config_path = out_dir / "config.json"
        config = json.loads(config_path.read_text())
        config["quantization_config"] = quantization_config(layers, all_linears, in_features)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        fmt = f"compressed-tensors {config['quantization_config']['format']}"
    write_manifest(out_dir)
    return fmt


def write_manifest(folder: Path) -> None:
    """sha256 of every file of the exported checkpoint (manifest.json itself excluded)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")


LOAD_CHECK_TOLERANCE = 1e-4  # max |logit difference| / max |logit| between the export and the evaluated copy


def block_slice(model_dir: Path, dest: Path, keep, blocks: int, trust_remote_code: bool) -> None:
    """dest: model_dir cut down to its first `blocks` blocks (config with that many layers; the kept
    tensors in one file)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    layers = config.num_hidden_layers
    for name, value in config.to_dict().items():  # per-layer settings (e.g. layer_types): the kept layers'
        if isinstance(value, list) and len(value) == layers and layers > 1 and hasattr(config, name):
            setattr(config, name, value[:blocks])
    config.num_hidden_layers = blocks
    config.save_pretrained(dest)
    weight_map = json.loads((model_dir / INDEX_NAME).read_text())["weight_map"]
    keys = [k for k in weight_map if keep(k)]
    write_index(dest, {k: "model.safetensors" for k in keys}, 0)
    save_file(read_keys(model_dir, keys, weight_map), str(dest / "model.safetensors"), metadata={"format": "pt"})


def check_loads(export_dir: str, evaluated_dir: str, block_prefix: str, blocks: int, encoder: bool,
                trust_remote_code: bool, threads: int) -> dict:
    """Proof, for a model of any size, that transformers loads the export and computes what the run
    evaluated: the embeddings, head and first `blocks` blocks of each checkpoint (one, or up to the first
    that holds experts), as a smaller model, loaded with from_pretrained (every tensor must be used, none
    missing) and run on 16 tokens. -> {"max_logit_error"} (relative). Raises RuntimeError naming
    transformers' own error when the export does not load or differs.
    Runs in a fresh process (a Ray task): the driver holds no weights."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # no load report on the user's terminal: the check answers for itself
    torch.set_num_threads(threads)
    auto = AutoModel if encoder else AutoModelForCausalLM

    def keep(key: str) -> bool:  # key names a block: block_prefix.<b>.<...>
        inside = key.split(block_prefix + ".", 1)
        return len(inside) == 1 or not inside[1].split(".", 1)[0].isdigit() or int(inside[1].split(".", 1)[0]) < blocks

    outputs = {}
    with tempfile.TemporaryDirectory(prefix="load-check-") as tmp:
        for name, folder in (("export", export_dir), ("evaluated", evaluated_dir)):
            dest = Path(tmp) / name
            block_slice(Path(folder), dest, keep, blocks, trust_remote_code)
            try:
                model, info = auto.from_pretrained(dest, trust_remote_code=trust_remote_code, dtype="auto",
                                                   output_loading_info=True)
            except Exception as e:  # whatever transformers raises is the answer
                raise RuntimeError(f"transformers cannot load it: {type(e).__name__}: {e}") from None
            unused = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
            if unused:
                raise RuntimeError(f"transformers loads it, but not every tensor: {unused}")
            with torch.no_grad():
                out = model.eval()(input_ids=torch.arange(16).remainder(model.config.vocab_size)[None])
            outputs[name] = (out.last_hidden_state if encoder else out.logits).float()
    ref = outputs["evaluated"]
    error = ((outputs["export"] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    if not error <= LOAD_CHECK_TOLERANCE:
        raise RuntimeError(f"loaded, its first block gives other outputs than the evaluated copy "
                           f"(relative error {error:.3g} > {LOAD_CHECK_TOLERANCE})")
    kept = f"{block_prefix}.0" if blocks == 1 else f"{block_prefix}.0-{blocks - 1}"
    return {"max_logit_error": error, "slice": f"embeddings, head and {kept}"}
