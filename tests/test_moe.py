"""Mixture-of-experts checkpoints (Mixtral, Qwen2-MoE with a shared expert, DeepSeek-V3 with dense first
blocks), saved by transformers itself: planned through transformers' conversion mapping, every expert's
projections compressed with its own Hessian from the tokens its router sent, routers left dense,
under-calibrated experts handled, and the export loaded back."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from orchestrator.capture import (
    BlockInputs,
    BlockKind,
    block_kind,
    build_blocks,
    capture_block_inputs,
    expert_outputs,
    recalibrate_experts,
    replay_of,
    run_blocks,
)
from orchestrator.checkpoint import read_keys
from orchestrator.cli import main
from orchestrator.experts import is_experts_module
from orchestrator.input_stats import expected_input_groups
from orchestrator.partition import load_config, partition_model
from orchestrator.recipe import load_recipe
from orchestrator.worker import compress_layer
from tests.helpers import REPO, hashes, run_cli
from tests.models import MOE_BLOCKS, MOE_CONFIGS, NUM_EXPERTS, save_random_moe

FAMILIES = list(MOE_CONFIGS)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory, micro_lm) -> dict:
    root = tmp_path_factory.mktemp("moe")
    return {kind: save_random_moe(kind, root / kind, micro_lm) for kind in FAMILIES}


@pytest.fixture(scope="module")
def unrouted_deepseek(tmp_path_factory, moe_models):
    """DeepSeek-V3 whose block-1 router never chooses expert 0: its score-correction bias is -1e4."""
    dest = tmp_path_factory.mktemp("unrouted")
    for item in moe_models["deepseek_v3"].iterdir():
        (dest / item.name).write_bytes(item.read_bytes())
    tensors = load_file(dest / "model.safetensors")
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"][0] = -1e4
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def block_inputs(folder, partition, config, seed=0, n=4, seq=32) -> BlockInputs:
    ids = torch.randint(0, 512, (n, seq), generator=torch.Generator().manual_seed(seed))
    return capture_block_inputs(config, read_keys(folder, list(partition.rest_keys), partition.key_to_file), ids, 2)


def inputs_of(folder, partition, config, shard_index: int) -> BlockInputs:
    """The inputs of a shard's first block, the dense blocks before it run on their own."""
    inputs = block_inputs(folder, partition, config)
    kind = block_kind(config)
    for shard in partition.shards[:shard_index]:
        blocks = build_blocks(kind, shard, read_keys(folder, list(shard.tensor_keys), partition.key_to_file))
        inputs = BlockInputs(run_blocks(blocks, inputs, shard)[0], inputs.kwargs)
    return inputs


@pytest.mark.parametrize("kind", FAMILIES)
def test_blocks_load_as_transformers_loads_them_and_save_back_as_it_saves(kind, moe_models):
    folder = moe_models[kind]
    partition = partition_model(folder, blocks_per_shard=1)
    config = load_config(folder)
    layout = block_kind(config).layout
    with safe_open(folder / "model.safetensors", "pt") as f:
        on_disk = {k: f.get_tensor(k) for k in f.keys()}
    block_keys = {k for s in partition.shards for k in s.tensor_keys}
    assert block_keys | set(partition.rest_keys) == set(on_disk) and not block_keys & set(partition.rest_keys)
    model_state = AutoModelForCausalLM.from_pretrained(folder).state_dict()  # transformers' own loading
    for shard in partition.shards:
        tensors = {k: on_disk[k] for k in shard.tensor_keys}
        as_module = layout.to_module(tensors)
        assert as_module.keys() <= model_state.keys()
        assert all(torch.equal(as_module[k], model_state[k]) for k in as_module), shard.index
        back = layout.to_checkpoint(as_module)
        assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_experts_projections_are_layers_and_routers_are_flagged(kind, moe_models):
    partition = partition_model(moe_models[kind], blocks_per_shard=1)
    layers = [layer for s in partition.shards for layer in s.linears]
    experts = [layer for layer in layers if layer.expert]
    E = NUM_EXPERTS[kind]
    assert len(experts) == len(MOE_BLOCKS[kind]) * E * 3  # gate, up and down of every expert of every MoE block
    for layer in experts:  # named and keyed as on disk: one 2D tensor per expert and projection
        assert layer.weight_key == layer.name + ".weight" and f".experts.{layer.expert.expert}." in layer.name
    with safe_open(moe_models[kind] / "model.safetensors", "pt") as f:
        assert all(tuple(f.get_slice(l.weight_key).get_shape()) == (l.out_features, l.in_features) for l in experts)
    assert partition.first_expert_block() == MOE_BLOCKS[kind][0]  # where the export's load check must reach
    routers = sorted(layer.name.split(".", 3)[3] for layer in layers if layer.router)
    expected = {"mixtral": ["mlp.gate"], "qwen2_moe": ["mlp.gate", "mlp.shared_expert_gate"],
                "deepseek_v3": ["mlp.gate"]}[kind]
    assert routers == sorted(expected * len(MOE_BLOCKS[kind]))
    if kind != "mixtral":  # the shared expert is an ordinary MLP
        assert any("shared_expert" in l.name and l.name.endswith("gate_proj") and not l.router for l in layers)

    default = load_recipe(REPO / "recipes" / "gptq-w4g128.yaml").stages[0]
    named = load_recipe(REPO / "recipes" / "gptq-w4g128.yaml", ["stages.0.targets=[mlp\\.gate$]"]).stages[0]
    router = next(layer for layer in layers if layer.router)
    assert not default.applies_to(router.name, router=True) and default.applies_to(experts[0].name)
    assert named.applies_to(router.name, router=True)  # a recipe that names the router compresses it


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_expert_gets_the_hessian_of_the_tokens_its_router_sent(kind, moe_models):
    folder = moe_models[kind]
    partition, config = partition_model(folder, blocks_per_shard=1), load_config(folder)
    index = MOE_BLOCKS[kind][0]
    shard = partition.shards[index]
    inputs = inputs_of(folder, partition, config, index)
    tensors = read_keys(folder, list(shard.tensor_keys), partition.key_to_file)
    kind_ = block_kind(config)
    blocks = build_blocks(kind_, shard, tensors)
    compressed = [layer for layer in shard.linears if not layer.router]  # what the default targets calibrate
    outputs, hessians = run_blocks(blocks, inputs, shard, compressed)

    # the same block with transformers' eager experts: same outputs; what its experts module was called with
    eager_config = copy.deepcopy(kind_.config)
    eager_config._experts_implementation = "eager"
    eager = build_blocks(BlockKind(eager_config, kind_.block_class, kind_.layout), shard, tensors)
    seen = []
    module = next(m for m in eager.modules() if is_experts_module(m))
    module.register_forward_pre_hook(lambda m, args: seen.append((args[0], args[1])))
    assert all(torch.equal(a, b) for a, b in zip(outputs, run_blocks(eager, inputs, shard)[0]))

    hidden, chosen = torch.cat([h for h, _ in seen]), torch.cat([c for _, c in seen])  # [T, H], [T, k]
    name = f"{shard.block_prefix}.{index}.mlp.experts"
    counts = hessians.expert_tokens[name]
    assert sum(counts.values()) == chosen.numel() and len(counts) == NUM_EXPERTS[kind]
    groups = expected_input_groups(compressed)
    assert sorted(map(sorted, hessians.groups.values())) == sorted(sorted(l.name for l in g) for g in groups.values())
    for layer in (l for l in shard.linears if l.expert and l.expert.input_of == "gate_up_proj"):
        x = hidden[(chosen == layer.expert.expert).any(-1)]  # the tokens routed to this expert
        assert counts[layer.expert.expert] == len(x)
        torch.testing.assert_close(hessians.of(layer.name), 2 / len(x) * x.T @ x, rtol=1e-4, atol=1e-6)


def test_a_split_blocks_parts_add_up_to_the_whole_blocks_output_bit_for_bit(tmp_path, micro_lm):
    """8 experts, 4 per token (so the order of the sum matters), cut in parts of 3, 3 and 2: each part's
    experts get the whole block's Hessians, and the head replaying the parts' outputs computes the whole
    block's output, bit for bit."""
    config = copy.deepcopy(MOE_CONFIGS["mixtral"])
    config.num_local_experts, config.num_experts_per_tok = 8, 4
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    folder, kind = tmp_path / "m", block_kind(config)
    whole, split = partition_model(folder, 1), partition_model(folder, 1, experts_per_shard=3)
    read = lambda keys: read_keys(folder, list(keys), whole.key_to_file)  # noqa: E731
    inputs = block_inputs(folder, whole, config)
    shard = whole.shards[0]
    blocks = build_blocks(kind, shard, read(shard.tensor_keys))
    expected, hessians = run_blocks(blocks, inputs, shard, list(shard.linears))

    parts = split.parts_of(split.shards[0])
    assert [p.experts for p in parts] == [(0, 3), (3, 6), (6, 8)]
    assert set(parts[0].tensor_keys).isdisjoint(parts[1].tensor_keys) and parts[1].context_keys
    kept = []
    for part in parts:
        blocks = build_blocks(kind, part, read(part.tensor_keys + part.context_keys))
        with expert_outputs(blocks, part) as outputs:
            _, part_hessians = run_blocks(blocks, inputs, part, list(part.linears))
        kept.append({module: o.kept for module, o in outputs.items()})
        for layer in part.linears:
            assert torch.equal(part_hessians.of(layer.name), hessians.of(layer.name)), layer.name
    head = split.head_of(parts[0])
    blocks = build_blocks(kind, head, read(head.tensor_keys))
    with expert_outputs(blocks, head, replay_of(tuple(kept), len(inputs.hidden))):
        combined, _ = run_blocks(blocks, inputs, head)
    assert all(torch.equal(a, b) for a, b in zip(combined, expected))


def test_an_expert_the_router_never_chose_gets_finite_statistics_and_a_finite_grid(unrouted_deepseek):
    folder = unrouted_deepseek
    partition, config = partition_model(folder, blocks_per_shard=1), load_config(folder)
    shard = partition.shards[1]
    inputs = inputs_of(folder, partition, config, 1)
    tensors = read_keys(folder, list(shard.tensor_keys), partition.key_to_file)
    blocks = build_blocks(block_kind(config), shard, tensors)
    layers = list(shard.linears)
    gate = next(l for l in layers if l.expert and l.expert.expert == 0 and l.name.endswith("gate_proj"))
    tokens = sum(h.shape[0] * h.shape[1] for h in inputs.hidden)
    stage = load_recipe(REPO / "recipes" / "gptq-w4g128.yaml", ["stages.0.group_size=32"]).stages
    rtn = load_recipe(REPO / "recipes" / "rtn-w4g128.yaml", ["stages.0.group_size=32", "stages.0.observer=mse"]).stages
    W = tensors[gate.weight_key].float()

    found = {}
    for policy, min_tokens in (("all-tokens", None), ("identity", None), ("all-tokens", 0)):
        _, hessians = run_blocks(blocks, inputs, shard, layers)
        assert hessians.expert_tokens["model.layers.1.mlp.experts"][0] == 0  # the fault landed
        routing = recalibrate_experts(blocks, inputs, shard, layers, hessians, min_tokens, policy)
        H = hessians.of(gate.name)
        assert torch.isfinite(H).all()
        W_hat, metrics, grid = compress_layer(W, gate.name, stage, H)
        assert torch.isfinite(grid.scale).all() and (grid.scale > 0).all() and torch.isfinite(W_hat).all()
        assert metrics.relative_error < 0.5  # never zeroed as "dead inputs"
        found[(policy, min_tokens)] = (routing["model.layers.1.mlp.experts"], H, hessians.n[hessians.leader(gate.name)], W_hat)

    routing, H, n, _ = found[("all-tokens", None)]
    assert 0 in routing["under_calibrated"] and routing["min_tokens"] == 64 and routing["tokens"][0] == 0
    assert n == tokens and torch.linalg.eigvalsh(H.double()).min() > 0  # every token, as if routed: full rank
    for key in (("identity", None), ("all-tokens", 0)):  # H = I: GPTQ rounds to nearest
        _, H, _, W_hat = found[key]
        assert torch.equal(H, torch.eye(64))
        assert torch.equal(W_hat, compress_layer(W, gate.name, rtn)[0])
    assert found[("all-tokens", 0)][0]["under_calibrated"] == []  # min_tokens 0: nobody recalibrated


SMALL = ["data.calibration.num_samples=16", "data.calibration.seq_len=64", "data.eval.max_windows=4",
         "data.eval.speed=false", "tracking.enabled=false"]
METHODS = {  # the recipes, at group size 32 / the 2:4 pattern (the experts' widths are 64)
    "rtn": ("rtn-w4g128", ["stages.0.group_size=32"]),
    "gptq": ("gptq-w4g128", ["stages.0.group_size=32"]),
    "2of4": ("wanda-2of4", []),
}
RTN8 = {"rtn8": ("rtn-w8", [])}  # 8 bits per channel: one family only (test_an_8_bit_moe_export...)


def run(kind: str, method: str, moe_models, out, *extra) -> dict:
    recipe, overrides = {**METHODS, **RTN8}[method]
    overrides = [f"model.path={moe_models[kind]}", f"output.dir={out}", f"output.name={kind}-{method}",
                 "cluster.workers=2", *SMALL, *overrides, *extra]
    assert main(["run", str(REPO / "recipes" / f"{recipe}.yaml"), *overrides, "--quiet"]) == 0
    run_dir = out / f"{kind}-{method}"
    return json.loads((run_dir / "report.json").read_text()) | {"dir": run_dir}


class Runs(dict):
    """The module's runs, each made the first time a test asks for it (so `-k` runs only what it selects)."""

    def __init__(self, moe_models, out):
        super().__init__()
        self.moe_models, self.out = moe_models, out

    def __missing__(self, key: tuple[str, str]) -> dict:
        self[key] = run(*key, self.moe_models, self.out)
        return self[key]


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, moe_models, shared_ray) -> Runs:
    return Runs(moe_models, tmp_path_factory.mktemp("moe-runs"))


def export_tensors(run_dir) -> dict[str, torch.Tensor]:
    index = json.loads((run_dir / "model" / "model.safetensors.index.json").read_text())["weight_map"]
    return read_keys(run_dir / "model", list(index), index)


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_moe_runs_compress_every_expert_leave_routers_dense_and_reload(kind, method, moe_runs, moe_models):
    report = moe_runs[(kind, method)]
    moe = report["experts"]
    E, blocks = NUM_EXPERTS[kind], len(MOE_BLOCKS[kind])
    assert moe["expert_matrices"] == moe["expert_matrices_compressed"] == blocks * E * 3
    assert moe["routers"] and moe["routers_compressed"] == []
    exported, dense = export_tensors(report["dir"]), load_file(moe_models[kind] / "model.safetensors")
    partition = partition_model(moe_models[kind], 1)
    routers = [l for s in partition.shards for l in s.linears if l.router]
    for layer in routers:  # untouched, byte for byte
        assert torch.equal(exported[layer.weight_key], dense[layer.weight_key]), layer.name
    experts = [l for s in partition.shards for l in s.linears if l.expert]
    if method != "2of4":  # every expert's projections packed, per expert, as vLLM's fused-MoE loader reads them
        assert all(f"{l.name}.weight_packed" in exported and l.weight_key not in exported for l in experts)
        ignore = json.loads((report["dir"] / "model" / "config.json").read_text())["quantization_config"]["ignore"]
        assert all(l.name in ignore and l.weight_key.removesuffix(".weight") in ignore for l in routers)
    first = MOE_BLOCKS[kind][0]  # the load check reached the first block with experts
    assert report["size"]["load_check"]["slice"].endswith(f"model.layers.0-{first}" if first else "model.layers.0")

    # transformers loads the whole export (the experts dequantized into its fused parameters) and computes
    # the logits the run evaluated
    sample = load_file(report["dir"] / "eval" / "sample_logits.safetensors")
    model = AutoModelForCausalLM.from_pretrained(report["dir"] / "model").eval()
    with torch.no_grad():
        logits = model(input_ids=sample["input_ids"][None]).logits[0].float()
    assert ((logits - sample["compressed"]).norm() / sample["compressed"].norm()).item() < 1e-5
    assert ((logits - sample["dense"]).norm() / sample["dense"].norm()).item() > 1e-4  # really compressed
    state = model.state_dict()
    for layer in experts:
        W = state[layer.expert.param][layer.expert.expert, layer.expert.start:layer.expert.stop]  # [out, in]
        if method == "2of4":
            assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all(), layer.name
            assert torch.equal(W, exported[layer.weight_key])
        else:  # 4-bit groups of 32: at most 16 levels per group, and the library's own decoding agrees
            assert all(g.unique().numel() <= 16 for g in W.reshape(W.shape[0], -1, 32).flatten(0, 1))
            assert torch.equal(W, decompress(exported, layer.name, 32))
    q = report["quality"]
    assert q["router"]["topk_agreement"] > 0.5 and 0 <= q["router"]["same_experts"] <= 1
    if method != "rtn":  # calibrated: each expert's tokens recorded, every one sent somewhere
        routing = moe["routing"]
        assert len(routing) == blocks and all(len(r["tokens"]) == E for r in routing.values())
        assert all(sum(r["tokens"]) == 16 * 64 * MOE_CONFIGS[kind].num_experts_per_tok for r in routing.values())
        assert {f"expert_tokens-{m}.png" for m in routing} <= {p.name for p in (report["dir"] / "plots").iterdir()}


def decompress(tensors: dict[str, torch.Tensor], name: str, group_size: int | None, bits: int = 4) -> torch.Tensor:
    """compressed-tensors' own decoding of one packed layer of the export (group_size None: per channel)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], format="pack-quantized", weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=True, strategy="channel" if group_size is None else "group",
        group_size=group_size))
    local = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    return compressor.decompress(local, scheme)["weight"].to(local["weight_scale"].dtype)


@pytest.mark.slow
def test_an_8_bit_moe_export_packs_every_expert_as_loaded(moe_models, tmp_path, shared_ray):
    """RTN W8 per channel (recipes/rtn-w8.yaml) on Mixtral: every expert packed in 8 bits; compressed-tensors'
    decoding of each is what transformers loads into its fused parameters, and the logits are the run's."""
    report = run("mixtral", "rtn8", moe_models, tmp_path)
    exported = export_tensors(report["dir"])
    experts = [l for s in partition_model(moe_models["mixtral"], 1).shards for l in s.linears if l.expert]
    group = json.loads((report["dir"] / "model" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [g["weights"]["num_bits"] for g in group.values()] == [8]
    model = AutoModelForCausalLM.from_pretrained(report["dir"] / "model").eval()
    state = model.state_dict()
    for layer in experts:
        assert exported[f"{layer.name}.weight_packed"].numel() * 4 == layer.in_features * layer.out_features  # 8 bits
        W = state[layer.expert.param][layer.expert.expert, layer.expert.start:layer.expert.stop]
        assert torch.equal(W, decompress(exported, layer.name, None, bits=8)), layer.name
    sample = load_file(report["dir"] / "eval" / "sample_logits.safetensors")
    with torch.no_grad():
        logits = model(input_ids=sample["input_ids"][None]).logits[0].float()
    assert ((logits - sample["compressed"]).norm() / sample["compressed"].norm()).item() < 1e-5

    # `orchestrator eval` lists every expert's error, as the run's workers measured it
    out = tmp_path / "eval.json"
    proc = run_cli("eval", str(report["dir"] / "model"), "--baseline", str(moe_models["mixtral"]), "--max-windows",
                   "2", "--no-speed", "--no-tracking", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    by_name = {layer["name"]: layer for layer in json.loads(out.read_text())["layers"]}
    measured = {layer["name"]: layer for s in report["shards"] for layer in s["layers"]}
    downs = [l for l in experts if l.expert.param.endswith("down_proj")]  # stored whole: [H, I] per expert
    assert len(downs) == len(experts) // 3
    for layer in downs:
        row = by_name[f"{layer.expert.param}[{layer.expert.expert}]"]
        assert row["relative_error"] == pytest.approx(measured[layer.name]["relative_error"], rel=1e-4)
    assert all(0 < by_name[f"{l.expert.param}[{l.expert.expert}]"]["relative_error"] < 0.05 for l in experts)


@pytest.mark.slow
def test_moe_bytes_do_not_depend_on_worker_count(moe_runs, moe_models, tmp_path):
    two = moe_runs[("mixtral", "gptq")]
    one = run("mixtral", "gptq", moe_models, tmp_path, "cluster.workers=1")
    pids = lambda report: {s["worker"]["pid"] for s in report["shards"]}
    assert len(pids(two)) == 2 and len(pids(one)) == 1
    assert hashes(one["dir"]) == hashes(two["dir"])


@pytest.mark.slow
@pytest.mark.parametrize("kind, method, per_shard", [("deepseek_v3", "gptq", 5), ("qwen2_moe", "2of4", 3)])
def test_expert_split_shards_give_the_bytes_of_whole_blocks(kind, method, per_shard, moe_runs, moe_models, tmp_path):
    whole = moe_runs[(kind, method)]
    split = run(kind, method, moe_models, tmp_path, f"partition.experts_per_shard={per_shard}")
    E = NUM_EXPERTS[kind]
    ranges = [[start, min(start + per_shard, E)] for start in range(0, E, per_shard)]
    for b in MOE_BLOCKS[kind]:  # every MoE block cut in those parts, over both workers
        assert [s["expert_range"] for s in split["shards"] if s["modules"] == [f"model.layers.{b}"]] == ranges
    assert len({s["worker"]["pid"] for s in split["shards"]}) == 2
    assert same_tensors(split["dir"], whole["dir"])
    assert split["experts"]["routing"] == whole["experts"]["routing"]
    untimed = lambda report: {k: v for k, v in report["quality"]["compressed"].items() if k != "seconds"}  # noqa: E731
    assert untimed(split) == untimed(whole)


def same_tensors(a, b) -> bool:
    """The two exports hold the same tensors, bit for bit (in files cut differently)."""
    x, y = export_tensors(a), export_tensors(b)
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_an_unrouted_expert_is_reported_and_compressed_from_every_token(unrouted_deepseek, tmp_path, shared_ray):
    """Sequential mode (the compressed blocks' outputs feed the next, MoE, block), whole blocks on 2 workers
    and the experts split in parts of 5 on 1 worker: the same bytes."""
    models = {"deepseek_v3": unrouted_deepseek}
    reports = [run("deepseek_v3", "gptq", models, tmp_path / "whole", "partition.calibration=sequential"),
               run("deepseek_v3", "gptq", models, tmp_path / "split", "partition.calibration=sequential",
                   "partition.experts_per_shard=5", "cluster.workers=1")]
    for report in reports:
        assert report["calibration"]["mode"] == "sequential"
        routing = report["experts"]["routing"]["model.layers.1.mlp.experts"]
        assert routing["tokens"][0] == 0 and 0 in routing["under_calibrated"]
        assert report["experts"]["under_calibrated_policy"] == "all-tokens"
        layers = {l["name"]: l for s in report["shards"] for l in s["layers"]}
        assert layers["model.layers.1.mlp.experts.0.gate_proj"]["relative_error"] < 0.5
    assert len(reports[1]["shards"]) == 1 + 2 * 3
    assert same_tensors(reports[0]["dir"], reports[1]["dir"])


@pytest.mark.slow
def test_groups_as_wide_as_a_layer_stay_one_scheme_so_the_experts_load(moe_models, tmp_path, shared_ray):
    # groups of 64 on 64-wide attention layers (one scale per channel) and 128-wide expert down projections:
    # one scheme targeting Linear, the only form transformers applies to experts (no modules of their own)
    report = run("mixtral", "rtn", moe_models, tmp_path, "stages.0.group_size=64")
    qc = json.loads((report["dir"] / "model" / "config.json").read_text())["quantization_config"]
    assert [g["targets"] for g in qc["config_groups"].values()] == [["Linear"]]
    assert report["size"]["load_check"]["max_logit_error"] <= 1e-4
