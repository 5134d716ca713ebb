"""Compare two exported model folders (compressed-tensors pack-quantized) tensor by tensor; print JSON.

    .venv/bin/python benchmarks/compare_exports.py A/model B/model [--out FILE.json]

For each packed weight (`*.weight_packed`, int32 words holding 32 / bits integers each, bits from
config.json's quantization_config): the fraction of the integers that differ; for scales (`*.weight_scale`)
and zero points the largest absolute and relative difference; for every other tensor (embeddings,
norms, head) the largest absolute difference. Keys in one folder only are listed. `identical` is true
when every tensor is equal bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def bits_of(folder: Path) -> int:
    quant = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    for group in (quant.get("config_groups") or {}).values():
        return int(group["weights"]["num_bits"])
    return 4


def unpack(words, bits: int):
    """int32 words [..., n] -> the unsigned integers they pack, [..., n * 32 / bits] (the low bits first)."""
    import torch

    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return ((words.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)


def compare(a: Path, b: Path) -> dict:
    import torch

    ta, tb, bits = tensors(a), tensors(b), bits_of(a)
    packed = {"integers": 0, "differ": 0, "tensors_differ": 0}
    scale = {"max_abs": 0.0, "max_rel": 0.0, "tensors_differ": 0}
    other = {"max_abs": 0.0, "tensors_differ": 0, "differ": []}
    for key in sorted(set(ta) & set(tb)):
        x, y = ta[key], tb[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            other["differ"].append(f"{key}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
            continue
        same = torch.equal(x, y)
        if key.endswith("weight_packed"):
            qx, qy = unpack(x, bits), unpack(y, bits)
            packed["integers"] += qx.numel()
            packed["differ"] += int((qx != qy).sum())
            packed["tensors_differ"] += not same
        elif key.endswith(("weight_scale", "weight_zero_point")):
            d = (x.double() - y.double()).abs()
            scale["max_abs"] = max(scale["max_abs"], float(d.max()))
            scale["max_rel"] = max(scale["max_rel"], float((d / y.double().abs().clamp(min=1e-30)).max()))
            scale["tensors_differ"] += not same
        elif not same:
            other["tensors_differ"] += 1
            other["max_abs"] = max(other["max_abs"], float((x.double() - y.double()).abs().max()))
            other["differ"].append(key)
    packed["fraction_differ"] = packed["differ"] / packed["integers"] if packed["integers"] else None
    only = {"only_in_a": sorted(set(ta) - set(tb)), "only_in_b": sorted(set(tb) - set(ta))}
    identical = not (packed["differ"] or scale["tensors_differ"] or other["tensors_differ"] or other["differ"]
                     or only["only_in_a"] or only["only_in_b"])
    return {"a": str(a), "b": str(b), "bits": bits, "tensors": len(ta), "identical": identical,
            "packed": packed, "scales": scale, "other": other, **only}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    result = json.dumps(compare(args.a, args.b), indent=2)
    if args.out:
        args.out.write_text(result + "\n")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
