"""Compress a model with llm-compressor (the peer), on given calibration token ids.

Runs INSIDE benchmarks/.peer-venv (setup_peer.sh), never in the project's venv:

    benchmarks/.peer-venv/bin/python benchmarks/peer_llmcompressor.py \
        MODEL_DIR CALIB.safetensors CASE OUT_DIR [--batch-size 8] [--threads N]

CALIB is a .safetensors (key "input_ids") or .pt file holding an int64 tensor
[n, seq_len] of token ids; they are fed as they are (no tokenization, no
shuffling, no truncation: num_calibration_samples = n, max_seq_length =
seq_len), so the peer sees exactly the windows our tool saw.

Cases, each set to the project's recipe defaults (recipes/<case>.yaml; --group-size changes the
quantization cases' groups, --defaults puts GPTQ at llm-compressor's own defaults):
  rtn-w4g128   QuantizationModifier, int4 weights, groups of 128, symmetric, min-max
  rtn-w3g128   the same with int3 weights
  gptq-w4g128  GPTQModifier, int4 weights, groups of 128, symmetric, act_order
               off (actorder=None), dampening_frac 0.01, block_size 128
  gptq-w3g128  the same with int3 weights
  sparsegpt-50 SparseGPTModifier, 50% unstructured, block_size 128,
               dampening_frac 0.01
  wanda-50     WandaPruningModifier, 50% unstructured
  wanda-2of4   WandaPruningModifier, mask_structure "2:4"
Every case targets the Linear layers and ignores lm_head: on a Llama that is
q/k/v/o_proj and gate/up/down_proj of every decoder block, the same layers our
tool compresses (it only ever looks inside the transformer blocks).

Pipeline: oneshot's default, pipeline="independent", which picks llm-compressor's
"sequential" pipeline for all of these modifiers (one decoder layer at a time,
each layer calibrated on the outputs of the already-compressed layers before it:
propagate_error=True, their default).

Writes OUT_DIR/model (the compressed checkpoint: save_compressed=True, i.e.
pack-quantized for the GPTQ cases; the pruning cases come out dense with their
zeros, compressed-tensors >= 0.15 having no sparse compressor) and
OUT_DIR/peer.json (versions, settings, wall times: load, oneshot, save), and
OUT_DIR/peer_logits.safetensors (the compressed model's logits on the first
calibration window, computed in this venv before saving, so the comparison can
check that the saved checkpoint loads to the same model in the project's venv).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

IGNORE = ["re:.*lm_head"]  # a regex: the pruning modifiers match names like "lm_head." (trailing dot) that a
# plain "lm_head" misses in llmcompressor 0.14.0.1, which then prunes lm_head too
EXTRA_IGNORE: list[str] = []  # --ignore (e.g. an MoE model's routers)


def load_ids(path: Path):
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        ids = load_file(str(path))["input_ids"]
    else:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise SystemExit(f"{path}: expected an int64 tensor [n, seq_len], got {ids.dtype} {tuple(ids.shape)}")
    return ids


SETTINGS = {"group_size": 128, "defaults": False}  # --group-size, --defaults


def weights(bits: int) -> dict:
    """int weights, symmetric, in groups; with --defaults the observer is left to the library (min-max)."""
    args = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": SETTINGS["group_size"]}
    return args if SETTINGS["defaults"] else {**args, "actorder": None, "observer": "memoryless_minmax"}


def gptq(bits: int):
    from llmcompressor.modifiers.gptq import GPTQModifier

    if SETTINGS["defaults"]:  # the library's own GPTQ settings (0.14: actorder "static", dampening 0.01)
        return GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights(bits)}},
                            ignore=IGNORE + EXTRA_IGNORE)
    return GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights(bits)}},
        ignore=IGNORE + EXTRA_IGNORE,
        block_size=128,
        dampening_frac=0.01,
        actorder=None,  # our act_order: false
    )


def rtn(bits: int):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights(bits)}},
                                ignore=IGNORE + EXTRA_IGNORE)


def sparsegpt(sparsity: float):
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    return SparseGPTModifier(sparsity=sparsity, mask_structure="0:0", block_size=128, dampening_frac=0.01,
                             targets=["Linear"], ignore=IGNORE)


def wanda(sparsity: float, mask_structure: str = "0:0"):
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return WandaPruningModifier(sparsity=sparsity, mask_structure=mask_structure, targets=["Linear"], ignore=IGNORE)


CASES = {
    "rtn-w4g128": lambda: rtn(4),
    "rtn-w3g128": lambda: rtn(3),
    "gptq-w4g128": lambda: gptq(4),
    "gptq-w3g128": lambda: gptq(3),
    "gptq-w2g128": lambda: gptq(2),
    "sparsegpt-50": lambda: sparsegpt(0.5),
    "wanda-50": lambda: wanda(0.5),
    "wanda-2of4": lambda: wanda(0.5, "2:4"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("calibration", help=".safetensors (key input_ids) or .pt: int64 [n, seq_len]")
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("out_dir")
    p.add_argument("--batch-size", type=int, default=1,
                   help="calibration windows per forward pass (oneshot's batch_size; its default is 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--save-dense", action="store_true", help="save_compressed=False")
    p.add_argument("--ignore", nargs="*", default=[], help="more modules to leave dense (GPTQ cases), e.g. "
                   "an MoE model's routers: re:.*mlp\\.gate$ (oneshot linearizes MoE experts itself, and by "
                   "default sends every calibration token through every expert: moe_calibrate_all_experts)")
    p.add_argument("--group-size", type=int, default=128, help="the quantization cases' group size (their names "
                   "say 128)")
    p.add_argument("--defaults", action="store_true", help="GPTQ at llm-compressor's own defaults (act-order "
                   "static, its observer) instead of the project recipes' settings")
    args = p.parse_args(argv)
    EXTRA_IGNORE.extend(args.ignore)
    SETTINGS.update(group_size=args.group_size, defaults=args.defaults)

    t_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = load_ids(Path(args.calibration))
    n, seq_len = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t_imported = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    t_loaded = time.perf_counter()

    modifier = CASES[args.case]()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=modifier,
        dataset=dataset,
        num_calibration_samples=n,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        batch_size=args.batch_size,
        pipeline="independent",  # the default: infers "sequential" for these modifiers
    )
    t_oneshot = time.perf_counter()

    with torch.no_grad():  # the compressed model's own logits on the first window, to check the saved checkpoint
        sample_logits = model(input_ids=ids[:1]).logits[0].float().contiguous()
    from safetensors.torch import save_file

    save_file({"input_ids": ids[0].contiguous(), "logits": sample_logits}, str(out / "peer_logits.safetensors"))
    t_logits = time.perf_counter()

    model_dir = out / "model"
    model.save_pretrained(model_dir, save_compressed=not args.save_dense)
    tokenizer.save_pretrained(model_dir)
    t_saved = time.perf_counter()

    import compressed_tensors
    import transformers

    report = {
        "case": args.case,
        "model_dir": str(Path(args.model_dir).resolve()),
        "calibration": {"path": str(Path(args.calibration).resolve()), "num_samples": n, "seq_len": seq_len},
        "modifier": {"class": type(modifier).__name__, **json.loads(modifier.model_dump_json(exclude_none=True))},
        "ignore": IGNORE + EXTRA_IGNORE, "settings": dict(SETTINGS),
        "oneshot": {"pipeline": "independent (-> sequential)", "batch_size": args.batch_size,
                    "shuffle_calibration_samples": False, "save_compressed": not args.save_dense},
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "timing": {"import_s": round(t_imported - t_start, 3), "load_s": round(t_loaded - t_imported, 3),
                   "oneshot_s": round(t_oneshot - t_loaded, 3), "save_s": round(t_saved - t_logits, 3),
                   "total_s": round(t_saved - t_start, 3)},
        "pid": os.getpid(),
    }
    (out / "peer.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report["timing"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
