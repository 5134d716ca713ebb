"""capture.py on its own (no Ray): the first block's inputs, blocks built alone, and the Hessians."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from orchestrator.capture import (
    BlockInputs,
    block_kind,
    build_blocks,
    capture_block_inputs,
    run_blocks,
)
from orchestrator.checkpoint import read_keys
from orchestrator.input_stats import expected_input_groups
from orchestrator.partition import load_config, partition_model
from tests.models import HIDDEN, LAYERS, save_random_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = save_random_model("llama", tmp_path_factory.mktemp("llama"))
    partition = partition_model(folder, blocks_per_shard=1)
    return folder, partition, load_config(folder)


def stem_inputs(llama, ids: torch.Tensor) -> BlockInputs:
    folder, partition, config = llama
    return capture_block_inputs(config, read_keys(folder, list(partition.rest_keys), partition.key_to_file), ids, 2)


def test_blocks_run_alone_reproduce_the_whole_models_hidden_states(llama):
    folder, partition, config = llama
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs = stem_inputs(llama, ids)
    assert [h.shape for h in inputs.hidden] == [torch.Size([2, 16, HIDDEN])] * 2  # batch by batch
    hidden = inputs.hidden
    for shard in partition.shards[:LAYERS - 1]:  # every block built on its own, from its tensors only
        tensors = read_keys(folder, list(shard.tensor_keys), partition.key_to_file)
        blocks = build_blocks(block_kind(config), shard, tensors)
        hidden, _ = run_blocks(blocks, BlockInputs(hidden, inputs.kwargs), shard)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():  # hidden_states[k]: after k blocks (the last one, after the final norm, is not compared)
        whole = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYERS - 1]
    assert torch.allclose(torch.cat(hidden), whole, atol=1e-5)


def test_layers_reading_one_input_share_one_hessian_as_the_planner_expects(llama):
    folder, partition, config = llama
    shard = partition.shards[0]
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1))
    inputs = stem_inputs(llama, ids)
    tensors = read_keys(folder, list(shard.tensor_keys), partition.key_to_file)
    blocks = build_blocks(block_kind(config), shard, tensors)
    _, hessians = run_blocks(blocks, inputs, shard, list(shard.linears))
    found = sorted(sorted(members) for members in hessians.groups.values())
    expected = sorted(sorted(l.name for l in members) for members in expected_input_groups(shard.linears).values())
    assert found == expected and len(found) == 4  # qkv, o, gate+up, down
    q, k = hessians.of(f"{shard.block_prefix}.0.self_attn.q_proj"), hessians.of(f"{shard.block_prefix}.0.self_attn.k_proj")
    assert q is k and q.shape == (HIDDEN, HIDDEN)

    # H = 2/n sum x x^T over every calibration token, x the input of q_proj (the attention's normed input)
    seen = []
    block = blocks[0]
    handle = block.self_attn.q_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, HIDDEN)))
    with torch.no_grad():
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            block(h, **kw)
    handle.remove()
    X = torch.cat(seen).double()  # [tokens, hidden]
    assert torch.allclose(q.double(), 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)


def test_padded_sentences_give_the_hessians_of_the_sentences_run_one_by_one(tmp_path):
    """Encoder calibration on padded sentences: the mask reaches the attention (the real tokens' states
    do not see the padding) and the padding tokens stay out of H, so H is the one of the sentences
    without padding, each run alone."""
    folder = save_random_model("bert", tmp_path / "bert")
    partition, config = partition_model(folder, blocks_per_shard=1), load_config(folder)
    shard = partition.shards[0]
    stem = read_keys(folder, list(partition.rest_keys), partition.key_to_file)
    blocks = build_blocks(block_kind(config), shard, read_keys(folder, list(shard.tensor_keys), partition.key_to_file))
    g = torch.Generator().manual_seed(2)
    lengths = [5, 12, 9, 3]
    ids = torch.zeros(4, 12, dtype=torch.long)
    mask = torch.zeros(4, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n], mask[row, :n] = torch.randint(1, 512, (n,), generator=g), 1
    _, padded = run_blocks(blocks, capture_block_inputs(config, stem, ids, 2, mask), shard, list(shard.linears))
    alone = None
    for row, n in enumerate(lengths):  # one sentence per batch, no padding at all
        inputs = capture_block_inputs(config, stem, ids[row:row + 1, :n], 1)
        alone = [run_blocks(blocks, inputs, shard, list(shard.linears))[1]] + ([] if alone is None else alone)
    for layer in shard.linears:
        leader = padded.leader(layer.name)
        assert padded.n[leader] == sum(lengths)  # only the real tokens
        expected = sum(h.H[h.leader(layer.name)].double() * h.n[h.leader(layer.name)] for h in alone) / sum(lengths)
        torch.testing.assert_close(padded.of(layer.name).double(), expected, rtol=1e-4, atol=1e-5)
