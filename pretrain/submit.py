"""Slurm launcher (submitit): ``python -m pretrain.submit [launcher flags] [pretrain flags]``.

    python -m pretrain.submit --nodes 8 --ngpus 8 --partition learnfair --timeout 4320 \
        --job_dir /checkpoint/$USER/mae_large --config configs/pretrain/mae_vit_large_in1k.yaml \
        --data_path /datasets/imagenet

One task per GPU; each joins the process group via the environment set here. On time-out or
preemption the job requeues itself and resumes from ``output_dir/checkpoint-last.pth``.
Everything is validated before submitting except ``data_path``, which may be mounted only on
the cluster's nodes: each task checks it when it starts.
``--cluster local`` runs the tasks as local processes and ``--cluster debug`` in this process
(both handy to try the set-up without Slurm).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Optional, Sequence

from .config import PretrainConfig, load_config, validate

logger = logging.getLogger("pretrain.submit")


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser("python -m pretrain.submit", add_help=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--ngpus", type=int, default=8, help="GPUs (= tasks) per node")
    p.add_argument("--timeout", type=int, default=4320, help="minutes")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--cpus_per_task", type=int, default=10)
    p.add_argument("--mem_gb_per_gpu", type=int, default=40)
    p.add_argument("--job_dir", default=None, help="submitit logs (default: output_dir/submitit)")
    p.add_argument(
        "--cluster",
        choices=["slurm", "local", "debug"],
        default=None,
        help="default: slurm when available, else local",
    )
    return p.parse_known_args(argv)


class PretrainJob:
    """The callable submitit runs in each task; requeues itself on preemption."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg

    def __call__(self):
        from .main import run, setup_logging

        _set_dist_env()
        setup_logging(int(os.environ.get("RANK", 0)))
        return run(self.cfg)

    def checkpoint(self):
        import submitit

        from .engine import LAST

        # the requeued job continues from output_dir/checkpoint-last.pth, not from the file a
        # first --resume named (which would throw away everything since)
        last = os.path.join(self.cfg.output_dir, LAST)
        cfg = self.cfg
        if os.path.isfile(last):
            cfg = dataclasses.replace(cfg, resume="", auto_resume=True)
        return submitit.helpers.DelayedSubmission(PretrainJob(cfg))


def _set_dist_env() -> None:
    """torch.distributed environment from submitit's view of the job (first node = master)."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # debug executor: one process, no distributed set-up
        return
    if env.num_tasks <= 1:
        return
    os.environ.update(
        MASTER_ADDR=env.hostnames[0],
        MASTER_PORT=os.environ.get(
            "MASTER_PORT", str(20000 + int(env.job_id.split("_")[0]) % 20000)
        ),
        RANK=str(env.global_rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.num_tasks),
    )


def validate_before_submitting(cfg: PretrainConfig) -> None:
    """Every check but whether files exist here: the data set, k-NN folders and ``--resume``
    may be mounted only on the cluster's nodes, where every task runs the full ``validate``
    before it starts."""
    validate(cfg, check_paths=False)
    if cfg.data_path and not os.path.isdir(cfg.data_path):
        logger.info("data_path %s not found here: the job checks it on its nodes", cfg.data_path)


def executor_parameters(args) -> dict:
    params = dict(
        nodes=args.nodes,
        tasks_per_node=args.ngpus,
        gpus_per_node=args.ngpus,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb_per_gpu * args.ngpus,
        timeout_min=args.timeout,
        name="mae_pretrain",
        slurm_signal_delay_s=120,
    )
    extra = {k: getattr(args, k) for k in ("partition", "account", "qos", "constraint")}
    params.update({f"slurm_{k}": v for k, v in extra.items() if v})
    return params


def main(argv: Optional[Sequence[str]] = None) -> int:
    import submitit

    args, rest = parse_args(argv)
    cfg, _ = load_config(rest)
    validate_before_submitting(cfg)
    job_dir = args.job_dir or os.path.join(cfg.output_dir, "submitit")
    executor = submitit.AutoExecutor(folder=job_dir, cluster=args.cluster, slurm_max_num_timeout=30)
    params = executor_parameters(args)
    if executor.cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor.update_parameters(**params)
    job = executor.submit(PretrainJob(cfg))
    print(f"submitted job {job.job_id}; logs in {job_dir}")
    if executor.cluster == "debug":
        job.result()
    return 0


if __name__ == "__main__":
    sys.exit(main())
