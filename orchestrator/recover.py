"""Recovery: distillation fine-tuning of the compressed model against the dense one, with DeepSpeed's ZeRO
engine inside Ray Train workers (TorchTrainer: one process per worker, gloo on CPU, NCCL on GPU).

Student: the compressed model as the run evaluates it. What trains is `recover.train`:

- "weights": the compressed Linear weights, as latent float32 weights W seen in the forward pass as

      W_eff = mask * grid(W),   grid(W) = (clamp(round(W / s) + z, qmin, qmax) - z) * s

  with each layer's own scales s and zeros z fixed, and mask the layer's nonzero pattern after pruning,
  fixed (pruned layers only). The rounding's gradient passes straight through (STE).
- "scales": each group's scale s of the quantized layers, the integers fixed (EfficientQAT's E2E-QP):

      W_eff = mask * (q - z) * s

  a smooth function of s, with no rounding in the way; the export keeps its integers and stores the
  trained scales. Pruned-only layers stay as they are.

Teacher: the dense model, frozen. Loss: KL(p_teacher || p_student) of the next-token distributions, mean
per token, plus `hidden_mse` x the MSE of the last hidden states. Afterwards every trained layer is put
back on its grid (scales rounded to the dtype the export stores them in), mask applied: what is exported
is exactly what the student computed with.

Ray Train checkpoints hold DeepSpeed's own checkpoint (torch.save files). They are read back with
torch.load(weights_only=True): tensors, containers and the three small records DeepSpeed stores
(weights_only_checkpoint_engine). A file holding anything else (a planted pickle) is refused, never run.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from orchestrator.errors import RunFailed
from orchestrator.recipe import RecoverConfig
from orchestrator.files import atomic_path
from orchestrator.techniques.grid import int_range


CHECKPOINT_TAG = "recover"  # DeepSpeed's checkpoint subfolder (not "latest": DeepSpeed writes a file by that name)


@dataclass
class TrainedLayer:
    """A compressed Linear the student trains, and how it was compressed."""

    module: str  # module name in the loaded model
    weight_key: str  # its checkpoint key
    bits: int | None  # None: pruned only
    group_size: int | None  # columns per scale
    pruned: bool  # its zeros are a mask to keep


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class GridLinear(nn.Module):
    """A Linear [out, in] seen on its quantization grid and under its mask, training its latent weight
    (train="weights") or its scales (train="scales"; a layer without a grid then trains nothing)."""

    def __init__(self, linear: nn.Linear, layer: TrainedLayer, scale: torch.Tensor | None,
                 zero: torch.Tensor | None, train: str = "weights"):
        super().__init__()
        W = linear.weight.detach().float().clone()  # [out, in], on the grid
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(),
                                                                  requires_grad=False)
        self.bits, self.group_size, self.shape = layer.bits, layer.group_size, W.shape
        self.register_buffer("mask", (W != 0) if layer.pruned else None)
        self.register_buffer("zero", zero)  # [out, in / group_size] float32 (integers)
        self.scale_dtype = None if scale is None else scale.dtype  # what the export stores
        scale = None if scale is None else scale.float()  # [out, in / group_size]
        if train == "scales" and self.bits is not None:
            qmin, qmax = int_range(self.bits)
            q = torch.clamp(torch.round(self._groups(W) / scale.unsqueeze(-1)) + zero.unsqueeze(-1), qmin, qmax)
            self.register_buffer("codes", q - zero.unsqueeze(-1))  # [out, in / group_size, group_size], fixed
            self.scale = nn.Parameter(scale)
        else:
            self.codes = None
            self.weight = nn.Parameter(W, requires_grad=train == "weights")
            self.register_buffer("scale", scale)

    def _groups(self, W: torch.Tensor) -> torch.Tensor:
        """[out, in] -> [out, in / group_size, group_size]."""
        return W.reshape(self.shape[0], self.shape[1] // self.group_size, self.group_size)

    def effective(self) -> torch.Tensor:
        """The weight the layer computes with, [out, in]."""
        if self.codes is not None:
            W = (self.codes * self.scale.unsqueeze(-1)).reshape(self.shape)
        elif self.bits is not None:
            qmin, qmax = int_range(self.bits)
            s, z = self.scale.unsqueeze(-1), self.zero.unsqueeze(-1)
            q = torch.clamp(_RoundSTE.apply(self._groups(self.weight) / s) + z, qmin, qmax)
            W = ((q - z) * s).reshape(self.shape)
        else:
            W = self.weight
        return W * self.mask if self.mask is not None else W

    def round_scales(self) -> None:
        """Trained scales onto the dtype the export stores them in (kept positive)."""
        if self.codes is not None:
            with torch.no_grad():
                tiny = torch.finfo(self.scale_dtype).tiny
                self.scale.copy_(self.scale.clamp(min=tiny).to(self.scale_dtype).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective(), self.bias)


def read_grids(export_dir: Path, index: dict[str, str], layers: list[TrainedLayer]) -> dict[str, torch.Tensor]:
    """Each quantized layer's scales (and zero points) from the packed export, whose files `index` maps
    each key to: {module.scale: [out, in / group_size] in the dtype the export stores, module.zero: the same
    shape, float32}."""
    grids, files = {}, {}
    for layer in layers:
        if layer.bits is None:
            continue
        prefix = layer.weight_key.removesuffix(".weight")
        fname = index[f"{prefix}.weight_scale"]
        tensors = files.setdefault(fname, load_file(export_dir / fname))
        scale = tensors[f"{prefix}.weight_scale"]
        zero = tensors.get(f"{prefix}.weight_zero_point")
        grids[f"{layer.module}.scale"] = scale.contiguous()
        grids[f"{layer.module}.zero"] = (torch.zeros_like(scale, dtype=torch.float32) if zero is None
                                         else zero.float()).contiguous()
    return grids


def swap_in_grid_linears(model: nn.Module, layers: list[TrainedLayer], grids: dict[str, torch.Tensor],
                         train: str) -> None:
    for layer in layers:
        parent_name, _, child = layer.module.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, GridLinear(getattr(parent, child), layer, grids.get(f"{layer.module}.scale"),
                                          grids.get(f"{layer.module}.zero"), train))


def distillation_loss(teacher_out, student_out, hidden_mse: float) -> torch.Tensor:
    """KL(p_teacher || p_student) per token, mean over tokens (+ hidden_mse x last-hidden-state MSE)."""
    t = F.log_softmax(teacher_out.logits.float(), dim=-1)  # [batch, seq, vocab]
    s = F.log_softmax(student_out.logits.float(), dim=-1)
    loss = (t.exp() * (t - s)).sum(-1).mean()
    if hidden_mse:
        loss = loss + hidden_mse * F.mse_loss(student_out.hidden_states[-1], teacher_out.hidden_states[-1])
    return loss


def deepspeed_config(cfg: RecoverConfig, world: int) -> dict:
    zero = {"stage": cfg.zero_stage}
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": cfg.batch_size * world, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9}


def weights_only_checkpoint_engine(ds_config):
    """DeepSpeed's torch.save checkpoint engine, its files read with torch.load(weights_only=True)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # Besides tensors and containers, DeepSpeed 0.19's ZeRO 1/2/3 checkpoints hold these plain records (an
    # IntEnum, the loss scale, a parameter's place in its flat partition), rebuilt without running any code.
    allowed = [ZeroStageEnum, LossScaler, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                why = next((line for line in str(e).splitlines() if "GLOBAL" in line), str(e).splitlines()[0])
                raise RunFailed(f"recover: refused to load checkpoint file {path}: it is not a plain DeepSpeed "
                                f"checkpoint (torch.load with weights_only=True: {why.strip()})") from None

    return WeightsOnlyCheckpointEngine(ds_config)


def build_engine(cfg: RecoverConfig, config: dict, layers: list[TrainedLayer], world: int, device):
    """-> (the DeepSpeed engine over the student, restored from Ray Train's checkpoint when this worker group
    was restarted; the frozen teacher)."""
    import deepspeed
    import ray.train
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(config["teacher"], dtype=torch.float32).eval().to(device)
    teacher.requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(config["student"], dtype=torch.float32)
    student.requires_grad_(False)
    swap_in_grid_linears(student, layers, load_file(config["grids"]), cfg.train)
    trainable = [p for p in student.parameters() if p.requires_grad]  # what GridLinear trains
    if cfg.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(trainable, lr=cfg.lr)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=deepspeed_config(cfg, world),
                                      dist_init_required=False)
    engine.checkpoint_engine = weights_only_checkpoint_engine(engine._config)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker group: continue from the last checkpoint
        with checkpoint.as_directory() as folder:
            loaded, _ = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        if loaded is None:
            raise RunFailed(f"recover: no DeepSpeed checkpoint in {folder}")
    return engine, teacher


def train_loop(config: dict) -> None:
    """One Ray Train worker: DeepSpeed ZeRO on the student, the teacher frozen beside it."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = RecoverConfig(**config["recover"])
    layers = [TrainedLayer(**layer) for layer in config["layers"]]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device()  # this worker's GPU when the trainer has GPUs (NCCL), else the CPU
    engine, teacher = build_engine(cfg, config, layers, world, device)
    start = engine.global_steps  # optimizer steps taken: 0, or the restored checkpoint's
    nodes = [None] * world  # where each rank runs, for the report
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if rank == 0:  # one line per worker group that starts training
        with open(config["groups"], "a") as f:
            f.write(json.dumps({"start_step": start, "zero_stage": int(engine.zero_optimization_stage()),
                                "nodes": nodes}) + "\n")
    ids = config["input_ids"]  # [num_samples, seq_len]
    hidden = cfg.hidden_mse > 0
    for step in range(start, cfg.steps):
        first = (step * world + rank) * cfg.batch_size  # each rank its own rows, the same for every run
        batch = ids[torch.arange(first, first + cfg.batch_size) % ids.shape[0]].to(device)
        with torch.no_grad():
            t_out = teacher(input_ids=batch, output_hidden_states=hidden)
        loss = distillation_loss(t_out, engine(input_ids=batch, output_hidden_states=hidden), cfg.hidden_mse)
        engine.backward(loss)
        engine.step()
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss)
        metrics = {"step": step + 1, "loss": mean_loss.item() / world}
        if rank == 0:  # the loss curve, on the shared work folder (a resumed step overwrites its line)
            with open(config["losses"], "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            with tempfile.TemporaryDirectory() as folder:
                engine.save_checkpoint(folder, tag=CHECKPOINT_TAG)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)
    save_trained_weights(engine, layers, config["out"], rank, cfg.zero_stage)


def save_trained_weights(engine, layers: list[TrainedLayer], out: str, rank: int, zero_stage: int) -> None:
    """Rank 0 writes every trained layer back on its grid, under its mask: {weight_key: [out, in] float32}, and
    with trained scales also {module.scale: [out, in / group_size], in the dtype the export stores}."""
    import deepspeed

    modules = {layer.module: engine.module.get_submodule(layer.module) for layer in layers}
    params = [p for m in modules.values() for p in m.parameters()]
    gather = deepspeed.zero.GatheredParameters(params) if zero_stage == 3 else contextlib.nullcontext()
    with gather, torch.no_grad():
        if rank == 0:
            tensors = {}
            for layer in layers:
                module = modules[layer.module]
                module.round_scales()
                tensors[layer.weight_key] = module.effective().cpu().contiguous()
                if module.codes is not None:
                    tensors[f"{layer.module}.scale"] = module.scale.to(module.scale_dtype).cpu().contiguous()
            with atomic_path(Path(out)) as tmp:
                save_file(tensors, str(tmp))


def train(cfg: RecoverConfig, teacher: Path, student: Path, grid_tensors: dict[str, torch.Tensor],
          layers: list[TrainedLayer], input_ids: torch.Tensor, work_dir: Path, seed: int) -> dict:
    """Run the distillation on Ray Train; -> {"tensors": the recovered weights (and trained scales, as
    save_trained_weights writes them), "losses": per step, "seconds",
    "nodes": each rank's Ray node id, "zero_stage": the ZeRO stage the engine ran, "start_steps": the step each
    worker group started training at ([0], or [0, 4] when a restarted group resumed from step 4's checkpoint)}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import ray

    use_gpu = ray.cluster_resources().get("GPU", 0) >= cfg.workers  # one GPU per worker, NCCL; else gloo on CPUs
    work_dir.mkdir(parents=True, exist_ok=True)
    grids = work_dir / "grids.safetensors"
    save_file(grid_tensors, grids)
    out = work_dir / "recovered.safetensors"
    started = time.perf_counter()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"recover": asdict(cfg), "layers": [asdict(l) for l in layers], "teacher": str(teacher),
                           "student": str(student), "grids": str(grids), "input_ids": input_ids,
                           "out": str(out), "losses": str(work_dir / "losses.jsonl"),
                           "groups": str(work_dir / "groups.jsonl"), "seed": seed},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name="recover", storage_path=str(work_dir / "ray-train"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    for name in ("losses.jsonl", "groups.jsonl"):
        (work_dir / name).unlink(missing_ok=True)
    try:
        result = trainer.fit()
    except Exception as e:  # Ray Train gave up after max_failures worker-group restarts
        raise RunFailed(f"recover: training failed ({type(e).__name__}: {str(e).strip().splitlines()[-1]})") from e
    if result.error:
        raise RunFailed(f"recover: training failed ({result.error})")
    by_step = {m["step"]: m["loss"] for m in map(json.loads, (work_dir / "losses.jsonl").read_text().splitlines())}
    losses = [by_step[step] for step in sorted(by_step)]
    groups = [json.loads(line) for line in (work_dir / "groups.jsonl").read_text().splitlines()]
    return {"tensors": load_file(out), "losses": losses, "seconds": round(time.perf_counter() - started, 3),
            "nodes": groups[-1]["nodes"], "zero_stage": groups[-1]["zero_stage"],
            "start_steps": [g["start_step"] for g in groups]}
