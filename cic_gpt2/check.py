"""`cic-gpt2 check`: the training job's launcher line with `check` for `train`, before the allocation is spent.

    srun python -m cic_gpt2 check --config run.yaml            # same srun / torchrun line as training
    torchrun --nproc_per_node 2 -m cic_gpt2 check --data prepared/ --run-dir runs/r1

Every rank reports its device, a real all-reduce, the DeepSpeed op the optimizer loads, the run dir (writable,
shared by every rank, room within filesystem and quota), the data and model readable offline; rank 0 prints
one table and the memory plan. Exit 0 when everything passed on every rank, else 1 on every rank. What each
probe does: cic_gpt2/probes.py, docs/launch.md ("Check a job before it runs").
"""
from __future__ import annotations

import argparse
import socket
import uuid

from cic_gpt2 import dist
from cic_gpt2.config import RunConfig, load_config

HELP = "probe every rank (device, all-reduce, ops, shared run dir, quota, data, model) before training"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the run config training will use")
    parser.add_argument("--data", help="prepared dataset directory (= data.path)")
    parser.add_argument("--run-dir", help="the run's output directory (= log.run_dir)")
    parser.add_argument("--resume", help="accepted and ignored, so the training line works unchanged")
    parser.add_argument("--gpu-mem", type=float, metavar="GIB",
                        help="GPU memory the memory plan is for (default: this node's GPU; none on CPU)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as for train")


def main(args: argparse.Namespace) -> int:
    import torch.distributed as tdist

    from cic_gpt2 import ds_config, probes

    flags = {"data.path": args.data, "log.run_dir": args.run_dir}
    cfg = load_config(RunConfig, args.config, list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v])
    info = dist.discover()
    ds_dict, ds_path = ds_config.load_and_build(cfg.train, info.world_size)
    precision = ds_config.precision_of(ds_dict)
    local = [probes.attempt("device", lambda: probes.device_probe(info)),
             probes.attempt("inputs", lambda: probes.inputs_probe(cfg)),
             probes.attempt("run dir", lambda: probes.run_dir_probe(cfg, info.world_size, precision)),
             probes.attempt("ops", lambda: probes.ops_probe(ds_dict))]
    dist.init(info, cfg.dist.timeout_s)
    try:
        comm_device = dist.device(info) if dist.backend_for_device() == "nccl" else "cpu"
        local.append(probes.attempt("all-reduce", lambda: probes.allreduce_probe(info.world_size, comm_device)))
        nonce = [uuid.uuid4().hex[:12]]
        tdist.broadcast_object_list(nonce, src=0)
        local.append(probes.attempt("shared", lambda: probes.shared_dir_probe(
            cfg.log.run_dir, info.rank, info.world_size, nonce[0])))
        rows = [None] * info.world_size
        tdist.all_gather_object(rows, (info.rank, socket.gethostname(), local))
    finally:
        dist.destroy()
    ok = all(p.ok for _, _, row in rows for p in row)
    if info.is_main:
        print(f"cic-gpt2 check: {info.world_size} rank(s) ({info.source}), ds_config {ds_path.name}")
        print(probes.table(rows))
        gpu_mem = args.gpu_mem or _gpu_mem_gib()
        print(probes.attempt("memory", lambda: probes.memory_plan(cfg, ds_dict, info.world_size, gpu_mem)).detail
              if gpu_mem else "memory plan: no GPU here (cic-gpt2 bench memory --gpu-mem N estimates one)")
        print("all checks passed" if ok else "FAILED: see the FAIL cells above; every rank exits 1")
    return 0 if ok else 1


def _gpu_mem_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0
