"""Section 16 (issue 18): where a worker's time goes, per block, in one process.

    .venv/bin/python benchmarks/profile_worker.py [--blocks 2] [--threads 1] [--smoke]

The real functions a CompressionWorker calls, on the first --blocks blocks of speed.py's 91M random Llama
with 128 x 256 calibration tokens (random ids, seed 0) and recipes/gptq-w4g128.yaml, timed one by one:
reading the shard's tensors (checkpoint.read_keys), building its blocks (capture.build_blocks), running
them without and with the Hessians (capture.run_blocks; and once more with each H computed as one whole
X^T X product, as before hessian.add_gram computed the blocks above the diagonal only), compressing
(worker.compress_shard with the recipe's stages), and writing the shard (worker.write_files: the
evaluated checkpoint and the packed export). To split compress: the MSE observer alone (grid.fit_qparams on each layer's weight in groups,
what act-order's static groups fit before the sweep) and GPTQ with the min-max observer instead.
Each block runs on the previous block's dense outputs, as in parallel calibration.

Writes results/16-profile.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import Bench, add_args, fmt, parse_shape, random_llama, resolve_model, table

SHAPE = "768,12,2048,12,4096"  # speed.py's 91M model
SMOKE_SHAPE = "128,2,256,2"
RECIPE = "recipes/gptq-w4g128.yaml"  # relative to the repository


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, f):
        t0 = time.perf_counter()
        out = f()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return out


def observer_alone(shard, tensors: dict, params) -> None:
    """The observer's fit of every layer's groups on W as it is (GPTQ act-order's static groups)."""
    import torch

    from orchestrator.techniques.grid import fit_qparams, group_view

    for layer in shard.linears:
        W = tensors[layer.weight_key].to(torch.float32)
        fit_qparams(group_view(W, params.group_size), params.bits, params.symmetric, "float32", params.observer)


def whole_products(f):
    """f() with every H computed as one whole X^T X product (hessian.add_gram's blocks off)."""
    from orchestrator.techniques import hessian

    saved, hessian.GRAM_BLOCK = hessian.GRAM_BLOCK, 1 << 30
    try:
        return f()
    finally:
        hessian.GRAM_BLOCK = saved


def with_observer(stages: list, observer: str) -> list:
    return [dataclasses.replace(s, params=dataclasses.replace(s.params, observer=observer)) for s in stages]


def profile_blocks(folder: Path, args, timer: Timer) -> int:
    """Every phase on the first args.blocks blocks -> the number of blocks profiled."""
    import torch
    from transformers import AutoConfig

    from orchestrator.capture import BlockInputs, block_kind, build_blocks, capture_block_inputs, run_blocks
    from orchestrator.checkpoint import read_keys
    from orchestrator.partition import partition_model
    from orchestrator.recipe import load_recipe
    from orchestrator.worker import ShardFiles, compress_shard, write_files

    recipe = load_recipe(RECIPE, [f"model.path={folder}"])
    stages, batch = recipe.stages, recipe.config.data.calibration.batch_size
    part, config = partition_model(folder, 1), AutoConfig.from_pretrained(folder)
    ids = torch.randint(0, config.vocab_size, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    rest = read_keys(folder, list(part.rest_keys), part.key_to_file)
    inputs = timer("embed (once per run, not per block)", lambda: capture_block_inputs(config, rest, ids, batch))
    kind, hidden, out = block_kind(config), inputs.hidden, Path(tempfile.mkdtemp(prefix="profile-"))
    shards = part.shards[:args.blocks]
    for shard in shards:
        tensors = timer("read the shard's tensors", lambda: read_keys(folder, list(shard.tensor_keys), part.key_to_file))
        blocks = timer("build the blocks", lambda: build_blocks(kind, shard, tensors))
        block_in = BlockInputs(hidden, inputs.kwargs)
        timer(FWD, lambda: run_blocks(blocks, block_in))
        hidden_out, H = timer(FWD_H, lambda: run_blocks(blocks, block_in, shard, list(shard.linears)))
        timer(WHOLE_H, lambda: whole_products(lambda: run_blocks(blocks, block_in, shard, list(shard.linears))))
        result = timer(COMPRESS, lambda: compress_shard(shard, tensors, stages, H.of, torch.device("cpu"), H.cross_of))
        timer(OBSERVER, lambda: observer_alone(shard, tensors, stages[0].params))
        timer(MINMAX, lambda: compress_shard(
            shard, tensors, with_observer(stages, "minmax"), H.of, torch.device("cpu"), H.cross_of))
        files = ShardFiles(str(out / f"evaluated-{shard.index}.safetensors"), str(out / f"export-{shard.index}.safetensors"))
        timer("write (evaluated + packed export)", lambda: write_files(shard, result, files))
        hidden = hidden_out
    shutil.rmtree(out, ignore_errors=True)
    return len(shards)


FWD, FWD_H, COMPRESS, OBSERVER, MINMAX = ("  forward alone (no Hessians)", "forward + Hessians",
                                         "compress (recipe: GPTQ, MSE observer)", "  MSE observer alone",
                                         "  compress with the min-max observer")
WHOLE_H = "  forward + Hessians, each H one whole X^T X product (before add_gram)"


def rows_of(seconds: dict[str, float], blocks: int) -> list[list]:
    """phase | seconds per block | share of the per-block total (the unindented rows: what a run does)."""
    per = {k: v / blocks for k, v in seconds.items()}
    total = sum(v for k, v in per.items() if not k.startswith((" ", "embed")))
    derived = {"  Hessians (forward + Hessians - forward alone)": per[FWD_H] - per[FWD],
               "  the rest of compress (factorisation, sweep; compress - observer alone)": per[COMPRESS] - per[OBSERVER]}
    order = ["read the shard's tensors", "build the blocks", FWD_H, FWD, *list(derived)[:1], WHOLE_H, COMPRESS,
             OBSERVER, *list(derived)[1:], MINMAX, "write (evaluated + packed export)"]
    values = {**per, **derived}
    rows = [[k, fmt(values[k]), f"{values[k] / total:.0%}"] for k in order]
    embed = next(k for k in seconds if k.startswith("embed"))
    return rows + [["per-block total (unindented rows)", fmt(total), "100%"], [embed, fmt(seconds[embed]), ""]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--shape", default=SHAPE, help="hidden,layers,ffn,heads[,vocab] (default: %(default)s)")
    add_args(p, "16-profile")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.samples, args.seq_len, args.blocks = SMOKE_SHAPE, 8, 64, 1
    import torch

    torch.set_num_threads(args.threads)
    with Bench() as bench:
        folder, params = random_llama(args.work.resolve() / "models", resolve_model("reference:tiny-lm"),
                                      **parse_shape(args.shape))
        timer = Timer()
        blocks = profile_blocks(folder, args, timer)
        rows = rows_of(timer.seconds, blocks)
        notes = (f"`{folder}` ({params / 1e6:.1f}M parameters), {blocks} block(s), {args.samples} x {args.seq_len} "
                 f"calibration tokens, {args.threads} thread(s), {RECIPE}; one process, no Ray. Indented rows "
                 "are parts of (or alternatives to) the row above them and are not in the total.")
        bench.write(args.results / "16-profile.md", "Where a worker's time goes, per block",
                    table(["phase", "seconds per block", "share"], rows),
                    {"seconds": timer.seconds, "blocks": blocks, "threads": args.threads, "model": str(folder),
                     "params": params, "tokens": [args.samples, args.seq_len]}, notes)
        print(table(["phase", "seconds per block", "share"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
