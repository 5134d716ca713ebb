"""The partitioner finds the transformer blocks of six architectures, from the files alone."""

import pytest
from tests.models import CONFIGS, LAYERS, save_random_model

from orchestrator.errors import UserError
from orchestrator.partition import CAUSAL_LM, ENCODER, partition_model


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_partition_finds_blocks(kind, tmp_path):
    _, prefix, sample_layer = CONFIGS[kind]
    model_dir = save_random_model(kind, tmp_path / kind)
    p = partition_model(model_dir, blocks_per_shard=2)
    assert p.block_prefix == prefix
    assert p.num_blocks == LAYERS
    assert [s.blocks for s in p.shards] == [(0, 1), (2,)]
    assert p.task == (ENCODER if kind == "bert" else CAUSAL_LM)
    names = [layer.name for s in p.shards for layer in s.linears]
    assert f"{prefix}.0.{sample_layer}" in names and f"{prefix}.2.{sample_layer}" in names
    assert all(n.startswith(prefix) for n in names)
    # every checkpoint tensor is either in exactly one shard or in the rest (embeddings, head, norms)
    shard_keys = [k for s in p.shards for k in s.tensor_keys]
    assert len(shard_keys) == len(set(shard_keys))
    assert sorted(shard_keys + list(p.rest_keys)) == sorted(p.key_to_file)
    assert not any(".layers." in k or ".h." in k or ".layer." in k for k in p.rest_keys)
    transposed = {layer.transposed for s in p.shards for layer in s.linears}
    assert transposed == ({True} if kind == "gpt2" else {False})  # GPT-2's Conv1D


def test_partition_rejects_folder_without_weights(tmp_path):
    model_dir = save_random_model("llama", tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors"):
        partition_model(model_dir, 1)


def test_partition_rejects_corrupt_safetensors(tmp_path):
    model_dir = save_random_model("llama", tmp_path / "m")
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a readable safetensors"):
        partition_model(model_dir, 1)
