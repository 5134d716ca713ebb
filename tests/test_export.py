"""The export is a compressed-tensors checkpoint that transformers loads, in a fresh process, with
the logits of the model the orchestrator compressed; quantized layers are packed, and sizes add up."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from transformers import AutoModel, AutoModelForCausalLM

from tests.helpers import REPO, load_export
from tests.models import save_random_model
from orchestrator.checkpoint import file_sha256
from orchestrator.cli import main
from orchestrator.export import MANIFEST, Scheme, pack_layer
from orchestrator.partition import partition_model
from orchestrator.recipe import load_recipe
from orchestrator.reference import resolve_reference
from orchestrator.worker import as_out_in, compress_layer

pytestmark = pytest.mark.slow

SCHEMES = {  # data-free, so the test can recompute the expected weights itself
    "w4g128": [{"method": "rtn", "bits": 4, "group_size": 128}],
    "w8": [{"method": "rtn", "bits": 8, "group_size": -1}],
    "w4g128-asym": [{"method": "rtn", "bits": 4, "group_size": 128, "symmetric": False}],
    "2of4": [{"method": "magnitude", "pattern": "2:4"}],
    "2of4-w4g128": [{"method": "magnitude", "pattern": "2:4"}, {"method": "rtn", "bits": 4, "group_size": 128}],
}
ARCHS = ["llama", "qwen2", "opt", "gpt2", "bert", "minilm", "llama-bf16"]
ENCODERS = {"bert", "minilm"}
# the main formats on every architecture; the variants (per-channel, asymmetric int8, 2:4 with 4 bits) where
# the layout differs: GPT-2's Conv1D layers stay dense whatever the grid, Qwen2 and MiniLM add nothing new
VARIANTS_ON = {"llama", "opt", "bert", "llama-bf16"}
CASES = [(arch, scheme) for arch in ARCHS for scheme in SCHEMES
         if scheme in ("w4g128", "2of4") or arch in VARIANTS_ON]


def write_recipe(path, model_dir, stages, name):
    path.write_text(yaml.safe_dump({
        "name": name, "model": {"path": str(model_dir)}, "stages": stages,
        "data": {"eval": {"enabled": False}}, "tracking": {"enabled": False}, "cluster": {"workers": 1},
    }))
    return path


def expected_model(model_dir, stages_yaml, encoder):
    """The dense model with every block Linear compressed here, by the same technique functions."""
    auto = AutoModel if encoder else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir).eval()
    stages = load_recipe(stages_yaml).stages
    params = dict(model.named_parameters())
    with torch.no_grad():
        for shard in partition_model(model_dir, 1).shards:
            for layer in shard.linears:
                p = params[f"{layer.name}.weight"]
                W_hat, _, _ = compress_layer(as_out_in(p, layer).float(), layer.name, stages, storage_dtype=p.dtype)
                p.copy_(W_hat.T if layer.transposed else W_hat)
    return model


LOAD_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModel, AutoModelForCausalLM
    cases = json.loads(sys.argv[1])
    ids = torch.load(sys.argv[2], weights_only=True)
    out = {}
    for name, (folder, encoder) in cases.items():
        auto = AutoModel if encoder else AutoModelForCausalLM
        model = auto.from_pretrained(folder).eval()
        with torch.no_grad():
            res = model(input_ids=ids)
        out[name] = (res.last_hidden_state if encoder else res.logits).float().contiguous()
    torch.save(out, sys.argv[3])
""")


def model_folder(arch, root):
    if arch == "minilm":
        return resolve_reference("minilm")
    if arch == "llama-bf16":  # scales stored in bfloat16 must still reproduce the weights exactly
        folder = save_random_model("llama", root / arch)
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)
        return folder
    return save_random_model(arch, root / arch)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, shared_ray):
    """Every architecture x scheme compressed by `orchestrator run`, then loaded in ONE fresh process."""
    root = tmp_path_factory.mktemp("export")
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")
    cases, expected, reports = {}, {}, {}
    for arch in ARCHS:
        model_dir = model_folder(arch, root)
        for scheme, stages in SCHEMES.items():
            if (arch, scheme) not in CASES:
                continue
            name = f"{arch}-{scheme}"
            recipe = write_recipe(root / f"{name}.yaml", model_dir, stages, name)
            overrides = [f"output.dir={root / 'runs'}"]
            assert main(["run", str(recipe), *overrides, "--quiet"]) == 0
            run_dir = root / "runs" / load_recipe(recipe, overrides).run_name
            reports[name] = json.loads((run_dir / "report.json").read_text()) | {"dir": run_dir, "dense": model_dir}
            cases[name] = (str(run_dir / "model"), arch in ENCODERS)
            model = expected_model(model_dir, recipe, arch in ENCODERS)
            with torch.no_grad():
                res = model(input_ids=ids)
            expected[name] = (res.last_hidden_state if arch in ENCODERS else res.logits).float()
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(cases), str(root / "ids.pt"),
                           str(root / "loaded.pt")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(root / "loaded.pt", weights_only=True), expected, reports


@pytest.mark.parametrize(("arch", "scheme"), CASES)
def test_export_loads_with_the_compressed_models_outputs(arch, scheme, exports):
    loaded, expected, reports = exports
    name = f"{arch}-{scheme}"
    got, want = loaded[name], expected[name]
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    report = reports[name]
    config = json.loads((report["dir"] / "model" / "config.json").read_text())
    quantized = "w" in scheme and arch != "gpt2"  # GPT-2's Conv1D layers stay dense (see export.py)
    assert ("quantization_config" in config) == quantized
    if quantized:
        qc = config["quantization_config"]
        # asymmetric grids: naive-quantized (int8), since compressed-tensors cannot load packed zero points
        assert qc["quant_method"] == "compressed-tensors"
        assert qc["format"] == ("naive-quantized" if scheme.endswith("asym") else "pack-quantized")
        assert "lm_head" in qc["ignore"] or arch in ENCODERS
        bits = 8 if scheme == "w8" else 4
        assert all(g["weights"]["num_bits"] == bits for g in qc["config_groups"].values())
        assert report["size"]["compressed_bytes"] < report["size"]["dense_bytes"]
    if "2of4" in scheme:  # the zeros survive packing: every group of 4 has at most 2 non-zeros
        model = load_export(report["dir"] / "model", arch in ENCODERS)
        for shard in partition_model(report["dense"], 1).shards:
            for layer in shard.linears:
                W = as_out_in(model.get_submodule(layer.name).weight, layer)
                assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all(), layer.name


def test_manifest_lists_every_file_with_its_hash(exports):
    _, _, reports = exports
    folder = reports["llama-w4g128"]["dir"] / "model"
    manifest = json.loads((folder / MANIFEST).read_text())["files"]
    on_disk = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    assert set(manifest) == on_disk
    for name, entry in manifest.items():
        assert entry["sha256"] == file_sha256(folder / name) and entry["bytes"] == (folder / name).stat().st_size


def test_w4_g128_costs_about_4_25_bits_per_weight(exports):
    _, _, reports = exports
    for arch in ("llama", "minilm"):
        bits = reports[f"{arch}-w4g128"]["size"]["bits_per_weight"]["quantized_layers"]
        assert 4.2 < bits < 4.3, (arch, bits)  # 4-bit integers + one float32 scale per 128 weights
    assert 8.0 < reports["llama-w8"]["size"]["bits_per_weight"]["quantized_layers"] < 8.3


def test_packing_refuses_weights_that_are_not_on_the_grid():
    W = torch.randn(8, 128)
    scale, zero = torch.full((8, 1), 0.1), torch.zeros(8, 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="does not survive packing"):
        pack_layer(W, scale, zero, Scheme(4, -1, True), "layers.0.q_proj")


@pytest.mark.parametrize("recipe", ["rtn-w4g128", "rtn-w8", "wanda-2of4", "sparsegpt-2of4-w4g128"])
def test_reference_model_export_reproduces_the_evaluated_logits_and_perplexity(recipe, tmp_path, micro_lm,
                                                                               shared_ray):
    overrides = [f"model.path={micro_lm}", f"output.dir={tmp_path}", "tracking.enabled=false",
                 "data.calibration.num_samples=16", "data.calibration.seq_len=64", "data.eval.max_windows=8"]
    assert main(["run", str(REPO / "recipes" / f"{recipe}.yaml"), *overrides, "--quiet"]) == 0
    run_dir = tmp_path / load_recipe(REPO / "recipes" / f"{recipe}.yaml", overrides).run_name
    report = json.loads((run_dir / "report.json").read_text())
    code = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        sample = load_file("{run_dir}/eval/sample_logits.safetensors")
        model = AutoModelForCausalLM.from_pretrained("{run_dir}/model").eval()
        with torch.no_grad():
            logits = model(input_ids=sample["input_ids"][None]).logits[0].float()
        print(((logits - sample["compressed"]).norm() / sample["compressed"].norm()).item())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) < 1e-5
    # `orchestrator eval` on the export gives the report's perplexity
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "eval", str(run_dir / "model"), "--json",
                           "--max-windows", "8", "--threads", "1", "--no-speed", "--no-tracking"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout)["quality"]["compressed"]["perplexity"]
    assert measured == pytest.approx(report["quality"]["compressed"]["perplexity"], rel=1e-6)
    assert ("w4" in recipe or "w8" in recipe) == (report["size"]["format"] == "compressed-tensors pack-quantized")
    assert report["size"]["compressed_bytes"] == sum(p.stat().st_size for p in (run_dir / "model").rglob("*")
                                                     if p.is_file())
