"""``stratarank train-stream --nproc N``: the streaming trainer over N ranks with TorchRec's
DistributedModelParallel, launched like batch training (``ranking/distributed.py``: torchrun-style
elastic launch, gloo on CPU, every table whole on one rank, dense layers replicated by DDP).

Each rank consumes the ``joined`` topic under its own consumer name (``<consumer>-r<rank>``) and trains
on its share of the examples (those whose ``example_id`` hashes to it), so the ranks split the work
the way they would split Kafka partitions, on either bus. The ranks stay in lockstep:

- every loop they exchange how many examples each holds; a step takes as many rows on every rank as
  the rank with the fewest holds (at most ``batch_size``), so the collective forward and backward always
  run together; a rank's surplus waits in its buffer (and in the checkpoint);
- the ids of every step's rows are gathered and applied to the id tables in rank order, so every rank
  admits and evicts the same ids into the same rows (the sharded tables agree on what a row means);
- a step is skipped on every rank when any rank's loss is not finite;
- rank 0 decides when to publish and checkpoint (its clock), guards and writes the version from the
  gathered unsharded weights, and writes one checkpoint holding every rank's own state; a refused
  update that must go back sends the serving weights to every rank.

The tables' Adagrad state lives in fbgemm's fused kernels and is not checkpointed: after a restart of a
multi-rank trainer it starts again from zero (the weights, dense optimizer, ids and positions resume).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import zlib

log = logging.getLogger("stratarank.stream_train")


def _mine(example_id: str, rank: int, world: int) -> bool:
    return zlib.crc32(example_id.encode("utf-8")) % world == rank


def _trainer_class():
    import torch
    import torch.distributed as dist

    from .stream_train import StreamTrainer

    class DistributedStreamTrainer(StreamTrainer):
        """A :class:`StreamTrainer` whose steps run on a DistributedModelParallel (see the module docstring)."""

        def __init__(self, config, rank: int, world: int, log_fn):
            from ranking.distributed import load_full_state, wrap_dmp
            from ranking.models import MultiTaskRanker

            self.world, self.rank = world, rank
            super().__init__(config, log_fn, rank)
            plain = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            tc = config.training
            self.dmp, _, self.optimizer = wrap_dmp(self.module, world, tc.lr, tc.weight_decay, tc.embedding_lr)
            load_full_state(self.dmp, plain)
            if getattr(self, "restored_optimizers", None):
                self.optimizer.load_state_dict(self.restored_optimizers[0])
            self.dmp.train()
            # rank 0 scores and publishes candidates with an unsharded copy of the gathered weights
            self.candidate = MultiTaskRanker(self.encoder.embedding_bag_configs(), self.encoder.dense_dim,
                                             self.objectives, self.model_config) if rank == 0 else None

        @property
        def training_module(self):
            return self.dmp

        def add(self, topic, partition, offset, next_offset, value) -> None:
            xid = value.get("example_id")
            if isinstance(xid, str) and not _mine(xid, self.rank, self.world):
                key = f"{topic}:{partition}"
                self.positions[key] = max(self.positions.get(key, 0), next_offset)
                self.counters["records"] += 1
                self.counters["other_ranks"] += 1
                return
            super().add(topic, partition, offset, next_offset, value)

        @staticmethod
        def _finite_loss(loss) -> bool:
            flag = torch.tensor([1.0 if bool(torch.isfinite(loss)) else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            return bool(flag.item())

        def _admit(self, columns: dict, now: float) -> None:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (columns, now))
            merged = {c: [v for cols, _ in gathered for v in cols.get(c) or ()] for c in columns}
            super()._admit(merged, max(t for _, t in gathered))

        def _zero_rows(self, changed: dict) -> None:
            from torch.distributed._shard.sharded_tensor import ShardedTensor

            from ranking.distributed import _plain_key
            from ranking.dynamic_ids import table_key

            wanted = {table_key(t): rows for t, rows in changed.items()}
            with torch.no_grad():
                for key, value in self.dmp.state_dict().items():
                    rows = wanted.get(_plain_key(key))
                    if rows is None or not isinstance(value, ShardedTensor):
                        continue
                    for shard in value.local_shards():
                        start, size = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
                        local = [r - start for r in rows if start <= r < start + size]
                        if local:
                            shard.tensor[torch.tensor(local, dtype=torch.long)] = 0.0

        def step_rows(self, n: int) -> None:
            """One collective step on the ``n`` oldest buffered rows of every rank."""
            rows, self.buffer = self.buffer[:n], self.buffer[n:]
            self._apply(rows)

        def publish(self) -> dict:
            from ranking.distributed import full_state_dict, load_full_state

            state = full_state_dict(self.dmp)                 # collective; the weights on rank 0
            fresh = [None] * self.world
            dist.all_gather_object(fresh, self.fresh)
            result = [None]
            if self.rank == 0:
                self.fresh = [t for part in fresh for t in part]
                self.candidate.load_state_dict(state)
                result = [self.judge(self.candidate)]
            dist.broadcast_object_list(result, src=0)
            result = result[0]
            if self.rank != 0:
                self.published = result.get("published") or self.published
                self.fresh = [] if result.get("published") or result.get("back") else self.fresh
            if result.get("back"):
                serving = [self.reference.state_dict() if self.rank == 0 else None]
                dist.broadcast_object_list(serving, src=0)
                load_full_state(self.dmp, serving[0])
            return result

        def checkpoint(self):
            from ranking.distributed import full_state_dict

            state = full_state_dict(self.dmp)
            ranks = [None] * self.world
            dist.all_gather_object(ranks, self.rank_state())
            if self.rank == 0:
                self._write_checkpoint(state, [self.optimizer.state_dict()], ranks)
            dist.barrier()
            return self.commit_positions()

    return DistributedStreamTrainer


def _rank_main(config_path: str, overrides: dict, max_idle_s: float | None) -> dict | None:
    """One rank of ``train-stream --nproc N`` (launched with env:// variables, like torchrun)."""
    import dataclasses
    import signal
    import warnings

    import torch.distributed as dist

    from strategy.errors import ValidationError

    from .stream_train import StreamConfig

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    say = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
    try:
        cfg = dataclasses.replace(StreamConfig.load(config_path), **overrides)
        try:
            trainer = _trainer_class()(cfg, rank, world, say)
        except ValidationError as exc:
            return {"validation_errors": [dataclasses.asdict(e) for e in exc.errors]}
        return _loop(trainer, cfg, rank, world, stop, max_idle_s)
    finally:
        dist.destroy_process_group()


def _loop(trainer, cfg, rank: int, world: int, stop: threading.Event, max_idle_s: float | None) -> dict:
    import torch.distributed as dist

    bus = cfg.bus.open()
    consumer = bus.consumer(f"{cfg.consumer}-r{rank}", [cfg.topic])
    bs, tc = cfg.training.batch_size, cfg.training
    last_publish = last_checkpoint = last_data = time.monotonic()
    waiting_since = None
    applied_at_publish = trainer.counters["applied"]
    try:
        while True:
            for r in consumer.poll(bs, min(0.2, tc.max_wait_s)):
                trainer.add(r.topic, r.partition, r.offset, r.next_offset, r.value)
                last_data = time.monotonic()
            mono = time.monotonic()
            idle = mono - last_data
            state = [None] * world
            dist.all_gather_object(state, (len(trainer.buffer), stop.is_set(), idle, trainer.counters["records"]))
            n = min(min(s[0] for s in state), bs)
            done = any(s[1] for s in state) or (
                max_idle_s is not None and all(s[2] >= (max_idle_s if s[3] else max(max_idle_s, 15.0)) for s in state))
            decision = [None]
            if rank == 0:   # rank 0's clock decides what every rank does this loop
                if n:
                    waiting_since = waiting_since or mono
                flush = bool(n) and (n >= bs or mono - waiting_since >= tc.max_wait_s or done)
                decision = [(flush, done or mono - last_publish >= cfg.publish_interval_s,
                             done or mono - last_checkpoint >= cfg.checkpoint_interval_s)]
            dist.broadcast_object_list(decision, src=0)
            flush, publish, checkpoint = decision[0]
            if flush:
                trainer.step_rows(n)
                waiting_since = None
            if publish:
                applied = [None] * world
                dist.all_gather_object(applied, trainer.counters["applied"] - applied_at_publish)
                if sum(applied):
                    trainer.publish()
                applied_at_publish = trainer.counters["applied"]
                last_publish = mono
            if checkpoint:
                consumer.commit(trainer.checkpoint())
                last_checkpoint = mono
            if done:
                break
        counters = [None] * world
        dist.all_gather_object(counters, dict(trainer.counters))
        return {"published_version": trainer.published, "ranks": counters}
    finally:
        consumer.close()
        bus.close()


def run_distributed(config_path: str, nproc: int, overrides: dict | None = None, max_idle_s: float | None = None) -> dict:
    """Launch ``nproc`` ranks (elastic launch, c10d rendezvous, like torchrun); rank 0's summary:
    the last published version and every rank's counters."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from ranking.distributed import _free_port

    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"stream-{uuid.uuid4().hex[:8]}",
                      rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                      monitor_interval=0.5, start_method="spawn")
    results = elastic_launch(lc, _rank_main)(os.path.abspath(config_path), dict(overrides or {}), max_idle_s)
    summary = results[0]
    if isinstance(summary, dict) and "validation_errors" in summary:
        from strategy.errors import FieldError, ValidationError

        raise ValidationError([FieldError(**e) for e in summary["validation_errors"]])
    return summary
