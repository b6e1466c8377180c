"""``stratarank train --nproc N``: the same model trained with TorchRec's DistributedModelParallel.

N worker processes are launched the way ``torchrun`` launches them (``torch.distributed``'s
elastic launcher: ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` in the environment,
``env://`` initialisation) with the gloo backend on CPU. Every embedding table is placed whole on
one rank (``ShardingType.TABLE_WISE``, planned by ``EmbeddingShardingPlanner`` over a
``Topology(world_size=N, compute_device="cpu")``); the dense parts (MLPs, gates, towers) are
replicated and kept in sync by DDP. Each global batch of ``batch_size`` rows is split evenly
between the ranks, so the optimisation matches single-process training on the same batches.

Every rank prepares the data deterministically (same seed, same split); validation shards rows
over the ranks (the sharded forward is collective) and all-gathers the outputs, so every rank
takes the same early-stopping decision. The best state is gathered unsharded to rank 0, which
evaluates it with an ordinary (unsharded) model and writes the registry version.
"""
from __future__ import annotations

import os
import socket
import time
import uuid


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table_wise_plan(model, world_size: int, pg=None):
    """A collective sharding plan placing every table of ``model``'s EBC whole on one rank (CPU)."""
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.sharding_plan import get_default_sharders
    from torchrec.distributed.types import ShardingType

    constraints = {
        t.name: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value],
                                     compute_kernels=[EmbeddingComputeKernel.FUSED.value])
        for t in model.ebc.embedding_bag_configs()
    }
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu"),
                                       constraints=constraints)
    sharders = get_default_sharders()
    plan = planner.collective_plan(model, sharders, pg) if pg is not None or _dist_ready() else \
        planner.plan(model, sharders)
    return plan, sharders


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def wrap_dmp(model, world_size: int, lr: float = 1e-3, weight_decay: float = 0.0, embedding_lr: float = 0.05):
    """``DistributedModelParallel`` over the current (gloo) process group, table-wise sharding.

    Returns ``(dmp, plan, dense_optimizer)``. The tables use fbgemm's fused CPU kernel with exact
    Adagrad (``embedding_lr``) applied in the backward pass (``apply_optimizer_in_backward``; fbgemm's
    CPU kernels have no Adam); ``dense_optimizer`` is Adam over the DDP-replicated parameters. The
    single-process trainer uses the same two rules (``ranking.train.make_optimizer``).
    """
    import torch
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    apply_optimizer_in_backward(torch.optim.Adagrad, model.ebc.parameters(), {"lr": embedding_lr, "eps": 1e-8})
    plan, sharders = table_wise_plan(model, world_size, dist.group.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay))
    return dmp, plan, dense


def full_state_dict(dmp) -> dict | None:
    """The unsharded CPU state_dict (keys as in the plain model) on rank 0; ``None`` elsewhere.
    Collective: every rank must call it."""
    import torch
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rank = dist.get_rank()
    out = {}
    state = dmp.state_dict()
    for key in sorted(state):
        value = state[key]
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=full)
            value = full
        elif isinstance(value, torch.Tensor):
            value = value.detach().clone()
        if rank == 0:
            out[_plain_key(key)] = value
    return out if rank == 0 else None


def load_full_state(dmp, state: dict) -> None:
    """Copy a plain (unsharded) state_dict into ``dmp``: each rank fills its local shards."""
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            src = state[_plain_key(key)]
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    offs = shard.metadata.shard_offsets
                    sizes = shard.metadata.shard_sizes
                    shard.tensor.copy_(src[tuple(slice(o, o + n) for o, n in zip(offs, sizes))])
            elif isinstance(value, torch.Tensor):
                value.copy_(src)


def _plain_key(key: str) -> str:
    for prefix in ("_dmp_wrapped_module.module.", "_dmp_wrapped_module.", "module."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _worker(config_path: str, overrides: dict, registry, progress: bool) -> dict | None:
    """One rank (launched by the elastic agent with env:// variables)."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from strategy.errors import ValidationError

    from .models import build_model
    from .train import final_metrics, finish, fit, load_train_config, prepare, seed_everything

    import logging
    import warnings

    # torchrec 1.8 warns about its own deprecations (ShardedTensor, broadcast_buffers, planner
    # reservations) on every run; they are not actionable here and bury the training log
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)

    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        cfg = load_train_config(config_path)
        if overrides:
            cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, **overrides))
        torch.set_num_threads(max(1, cfg.training.threads // world))
        log = (lambda *a, **k: print(*a, **k, flush=True)) if rank == 0 else (lambda *a, **k: None)
        t0 = time.perf_counter()
        seed_everything(cfg.training.seed)
        try:
            prep = prepare(cfg, log)
        except ValidationError as exc:  # bad input: every rank sees the same; report it, not a crash
            return {"validation_errors": [dataclasses.asdict(e) for e in exc.errors]}
        log(f"data: train {len(prep.train):,}, valid {len(prep.valid):,} rows; DMP over {world} processes (gloo, CPU)")
        seed_everything(cfg.training.seed)
        model = build_model(prep.encoder, cfg.objectives, cfg.model)
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        dmp, plan, dense_opt = wrap_dmp(model, world, cfg.training.lr, cfg.training.weight_decay,
                                       cfg.training.embedding_lr)
        load_full_state(dmp, init)  # sharding re-creates the tables: start from the same weights as nproc=1
        if rank == 0:
            placement = {}
            for module_plan in plan.plan.values():
                for table, ps in module_plan.items():
                    ranks = sorted({r for s in (ps.sharding_spec.shards if ps.sharding_spec else [])
                                    for r in [s.placement.rank()]})
                    placement[table] = f"{ps.sharding_type} rank {','.join(map(str, ranks))}"
            log("sharding plan: " + "; ".join(f"{t}: {p}" for t, p in placement.items()))
        result = fit(dmp, prep, cfg.training, rank=rank, world=world, log=log, progress=progress,
                     get_state=lambda: full_state_dict(dmp), optimizer=dense_opt)
        summary = None
        if rank == 0:
            plain = build_model(prep.encoder, cfg.objectives, cfg.model)
            plain.load_state_dict(result["best_state"])
            plain.eval()
            metrics = final_metrics(plain, prep, cfg.training)
            summary = finish(cfg, prep, result, metrics, result["best_state"], registry, log, True,
                             extra={"nproc": world, "sharding": "table_wise", "backend": "gloo",
                                    "wall_seconds": round(time.perf_counter() - t0, 2)})
        dist.barrier()
        return summary
    finally:
        dist.destroy_process_group()


def train_distributed(cfg, nproc: int = 2, registry=None, progress: bool = True, config_path: str | None = None,
                      overrides: dict | None = None) -> dict:
    """Launch ``nproc`` ranks like torchrun (elastic launch, env:// rendezvous) and return rank 0's
    summary."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config_path = config_path or cfg.source
    port = _free_port()
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"stratarank-{uuid.uuid4().hex[:8]}",
                      rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0,
                      monitor_interval=0.5, start_method="spawn")
    results = elastic_launch(lc, _worker)(os.path.abspath(config_path), dict(overrides or {}), registry, progress)
    summary = results[0]
    if isinstance(summary, dict) and "validation_errors" in summary:
        from strategy.errors import FieldError, ValidationError

        raise ValidationError([FieldError(**e) for e in summary["validation_errors"]])
    return summary
