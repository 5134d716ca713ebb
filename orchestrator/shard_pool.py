"""The compression actors and the shards running on them, shaped after Ray's `ray.util.ActorPool`:
`submit` hands a shard to an idle actor, `get_next` returns the next one to finish (or fail).

Calibrated runs chain activations from shard to shard. Shard k's input activations
are object refs known when shard k-1 is submitted (its dense outputs in parallel
mode, its compressed outputs in sequential mode), so Ray starts shard k as soon as
they exist, while earlier shards are still compressing. Activations never pass
through the driver.

In parallel mode the calibration batches travel in `partition.chunks` chunks, one
ref and one `calibrate` call each: shard k+1 starts on the first chunk while shard k
runs the second, so the chain's critical path is a chunk per shard, not the whole
pass (models with experts and the asymmetric dense chain pass everything at once).
An actor runs one caller's calls in the order they were submitted (Ray's actor task
order), so each shard's Hessians fold the batches in the same order, whatever the
chunking: the bytes out do not depend on it.

Where a chain link is missing (shards reused from the store, or refs forgotten
after a failure, since a lost node takes its objects with it), `input_of` rebuilds
it: the embedding, then each earlier shard's blocks run forward (dense in parallel
mode, the committed compressed shard in sequential mode). The same code on the
same inputs gives the same activations, so the output bytes do not depend on faults.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import ActorUnavailableError, RayError

from orchestrator.assemble import Layout
from orchestrator.capture import token_masks
from orchestrator.errors import RunFailed
from orchestrator.partition import Shard, load_config
from orchestrator.worker import CompressionWorker, ShardFiles, ShardResult

log = logging.getLogger(__name__)

MAX_UNAVAILABLE = 10  # per shard: "actor restarting" answers not counted as attempts, before they are


class ShardFailed(RunFailed):
    """A shard failed on every attempt it was allowed."""


class Retries:
    """Each shard gets `max_attempts` attempts (cluster.max_restarts + 1). An "actor restarting" answer
    (ActorUnavailableError) is not counted, up to MAX_UNAVAILABLE per shard, after a short wait."""

    def __init__(self, shards: list[Shard], max_attempts: int):
        self.max_attempts = max_attempts
        self.attempts = {s.index: 0 for s in shards}
        self.unavailable = {s.index: 0 for s in shards}

    def started(self, shard: Shard) -> None:
        self.attempts[shard.index] += 1

    def failed(self, shard: Shard, error: RayError, reason: str) -> None:
        """Count a failed attempt; raises ShardFailed once the shard has none left."""
        k = shard.index
        if isinstance(error, ActorUnavailableError) and self.unavailable[k] < MAX_UNAVAILABLE:
            self.unavailable[k] += 1
            self.attempts[k] -= 1
            time.sleep(0.5)
        elif self.attempts[k] >= self.max_attempts:
            raise ShardFailed(f"shard {k} ({shard.label}) failed {self.attempts[k]} times; "
                              f"last error: {reason}") from error


class ShardPool:
    """`workers` CompressionWorker actors (SPREAD over the nodes), the shards in flight on them, and the
    activation chain between shards."""

    def __init__(self, plan, gpus_per_worker: float, layout: Layout):
        self.plan, self.layout = plan, layout
        recipe, cluster = plan.recipe, plan.recipe.config.cluster
        self.stages = recipe.stages
        self.sequential = recipe.config.partition.calibration == "sequential"
        # asymmetric calibration (gptq.py): the dense chain runs beside the compressed one (plan.py checks the mode)
        self.asymmetric = self.sequential and any(getattr(s.params, "asymmetric", 0) > 0 for s in self.stages)
        config = load_config(plan.model_dir, recipe.config.model.trust_remote_code) if plan.calibrated else None
        workers = min(cluster.workers, len(plan.partition.shards))
        self.actors = [
            CompressionWorker.options(  # SPREAD: one worker per node first, so shards use every node
                num_cpus=cluster.cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=cluster.max_restarts,
                scheduling_strategy="SPREAD",
            ).remote(int(max(1, cluster.cpus_per_worker)), str(plan.model_dir), plan.partition.key_to_file, config)
            for _ in range(workers)
        ]
        self.idle = list(self.actors)  # a failed shard's actor goes last, so its retry goes to another first
        self.in_flight: dict[ray.ObjectRef, tuple[Shard, object]] = {}  # result ref -> (shard, its actor)
        self.inputs: dict[int, list[ray.ObjectRef]] = {}  # shard index -> its input hidden states, per chunk
        self.dense_inputs: dict[int, list[ray.ObjectRef]] = {}  # the same from the dense model (asymmetric)
        self.part_outputs: dict[int, ray.ObjectRef] = {}  # a part of an expert-split block -> its experts' outputs
        self.block_kwargs: list[ray.ObjectRef] | None = None  # per chunk what every block is called with besides them
        calibration, batch_size = plan.calibration, recipe.config.data.calibration.batch_size
        # padded sentences: per batch the tokens that count, and the mask the embedding gets
        self.attention_mask = calibration.attention_mask if calibration else None
        self.chunks = chunk_ranges(len(calibration.input_ids) if calibration else 0, batch_size,
                                   chunk_count(plan, self.sequential))
        masks = token_masks(self.attention_mask, batch_size)
        self.token_masks = [None if masks is None else masks[a:b] for a, b in self.chunks]

    def has_idle(self) -> bool:
        return bool(self.idle)

    def busy(self) -> bool:
        return bool(self.in_flight)

    def submit(self, shard: Shard) -> None:
        """Queue a shard on the first idle actor."""
        actor = self.idle.pop(0)
        self.in_flight[self._submit(shard, actor)] = (shard, actor)
        log.debug("shard %d submitted to worker %d", shard.index, self.actors.index(actor))

    def get_next(self, timeout: float) -> tuple[Shard, ShardResult | RayError] | None:
        """The next shard to finish and its result, or the RayError it failed with; None after `timeout`
        seconds without one (so the caller's loop wakes for signals)."""
        ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        if not ready:
            return None
        shard, actor = self.in_flight.pop(ready[0])
        self.idle.append(actor)
        try:
            result = ray.get(ready[0])
        except RayError as e:
            self.inputs.clear()  # the refs may have died with a node; later shards rebuild them
            self.dense_inputs.clear()
            self.part_outputs.clear()
            self.block_kwargs = None
            return shard, e
        if shard.experts is None:
            self.inputs.pop(shard.index, None)  # shard k's inputs are needed by nobody now (a part's: see input_of)
            self.dense_inputs.pop(shard.index, None)
        return shard, result

    def copy_rest(self, keys: list[str], files: ShardFiles, attempt: int = 0) -> ray.ObjectRef:
        """The tensors outside the blocks, copied into both checkpoints by one actor (another per attempt);
        the ref gives the bytes written."""
        return self.actors[attempt % len(self.actors)].write_rest.remote(keys, files)

    def close(self, keep_one: bool = False):
        """Kill the actors; keep_one: all but the first, returned (the caller kills it) -> actor | None."""
        kept = self.actors[0] if keep_one else None
        for actor in self.actors:
            if actor is not kept:
                ray.kill(actor)
        return kept

    def input_of(self, k: int, actor) -> list[ray.ObjectRef]:
        """Shard k's input activations per chunk (a part's: its block's), rebuilt on `actor` from the last
        known link if missing. After an expert-split block, they are its parts' expert outputs added up
        (`combine`; such models pass one chunk)."""
        partition = self.plan.partition
        k = partition.parts_of(partition.shards[k])[0].index
        if k not in self.inputs:
            if k == 0:  # the first block's inputs, from the embedding
                refs = actor.embed.options(num_returns=2 * len(self.chunks)).remote(
                    list(partition.rest_keys), self.plan.calibration.input_ids,
                    self.plan.recipe.config.data.calibration.batch_size, self.attention_mask, self.chunks)
                self.inputs[0], self.block_kwargs = refs[:len(self.chunks)], refs[len(self.chunks):]
                return self.inputs[0]
            previous = partition.shards[k - 1]
            parts = partition.parts_of(previous)
            hidden = self.input_of(parts[0].index, actor)
            if previous.experts is None:
                self.inputs[k] = [actor.forward.remote(previous, chunk, kwargs, self.compressed(previous))
                                  for chunk, kwargs in zip(hidden, self.block_kwargs)]
            else:
                outputs = [self.outputs_of(part, hidden, actor) for part in parts]
                self.inputs[k] = [actor.combine.remote(partition.head_of(previous), hidden[0], self.block_kwargs[0],
                                                       self.compressed(parts[0]), *outputs)]
                for part in parts:  # held by the combine call now
                    self.part_outputs.pop(part.index)
                self.inputs.pop(parts[0].index)
        return self.inputs[k]

    def dense_input_of(self, k: int, actor) -> list[ray.ObjectRef]:
        """Shard k's inputs in the dense model (asymmetric calibration: one chunk, whole blocks only, plan.py
        checks), rebuilt on `actor` from the last known link if missing."""
        if k == 0:
            return self.input_of(0, actor)  # the embedding is not compressed: both chains start alike
        if k not in self.dense_inputs:
            previous = self.plan.partition.shards[k - 1]
            self.dense_inputs[k] = [actor.forward.remote(previous, self.dense_input_of(k - 1, actor)[0],
                                                         self.block_kwargs[0], None)]
        return self.dense_inputs[k]

    def outputs_of(self, part: Shard, hidden: list[ray.ObjectRef], actor) -> ray.ObjectRef:
        """A part's expert outputs, rebuilt on `actor` if missing (from its committed file in sequential mode)."""
        if part.index not in self.part_outputs:
            head = self.plan.partition.parts_of(part)[0]
            self.part_outputs[part.index] = actor.forward.remote(part, hidden[0], self.block_kwargs[0],
                                                                 self.compressed(part), self.compressed(head))
        return self.part_outputs[part.index]

    def compressed(self, shard: Shard) -> str | None:
        """Where the blocks' outputs are computed from: a committed shard's evaluated file in sequential
        mode, the checkpoint (None) in parallel mode."""
        return self.layout.of_shard(shard).evaluated if self.sequential else None

    def _submit(self, shard: Shard, actor) -> ray.ObjectRef:
        """-> the ref of the shard's ShardResult; for calibrated runs, the next shard's inputs (or a part's
        expert outputs) are known."""
        k, files = shard.index, self.layout.of_shard(shard)
        compress = actor.compress.options(num_returns=2)
        if not self.plan.calibrated:
            return compress.remote(shard, self.stages, files)[0]
        hidden = self.input_of(k, actor)
        dense = self.dense_input_of(k, actor) if self.asymmetric else [None] * len(self.chunks)
        last = len(self.chunks) - 1
        dense_out = [actor.calibrate.remote(shard, hidden[c], self.block_kwargs[c], self.stages,
                                            self.plan.recipe.config.experts, not self.sequential or self.asymmetric,
                                            dense[c], self.token_masks[c], c == 0, c == last)
                     for c in range(len(self.chunks))]  # one chunk each, in order (the module docstring)
        if self.asymmetric:  # the dense chain's next link; the compressed chain's comes from compress
            self.dense_inputs[k + 1] = dense_out
        if self.sequential:
            head = self.plan.partition.parts_of(shard)[0]
            context = self.compressed(head) if head is not shard else None
            result, out = compress.remote(shard, self.stages, files, hidden[0], self.block_kwargs[0], context)
            out = [out]
        else:
            (result, _), out = compress.remote(shard, self.stages, files), dense_out
        if shard.experts is None:
            self.inputs[k + 1] = out
        else:
            self.part_outputs[k] = out[0]
        return result


def chunk_count(plan, sequential: bool) -> int:
    """How many chunks the calibration batches travel in: `partition.chunks` in parallel mode; one where a
    shard needs its whole calibration set at once (sequential mode compresses before handing on; experts
    are re-run over every token when under-calibrated)."""
    experts = any(layer.expert for shard in plan.partition.shards for layer in shard.linears)
    return 1 if sequential or experts else plan.recipe.config.partition.chunks


def chunk_ranges(samples: int, batch_size: int, chunks: int) -> list[tuple[int, int]]:
    """The calibration's batches [0, ceil(samples / batch_size)) cut in at most `chunks` consecutive ranges
    of near-equal length (earlier ones longer by one) -> [(first batch, end)]."""
    batches = max(1, -(-samples // batch_size))
    chunks = min(chunks, batches)
    sizes = [batches // chunks + (i < batches % chunks) for i in range(chunks)]
    return [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(chunks)]
