"""Slurm submission with submitit for every protocol: one task per GPU, requeued on time-out or
preemption, resuming from ``output_dir/checkpoint-last.pth``.

``--cluster local`` runs the tasks as local processes and ``--cluster debug`` in this process
(both handy to try a set-up without Slurm).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any, Callable

from . import preemption
from .config import ConfigError
from .launch import setup_logging
from .preemption import PreemptionStop


def launcher_parser(prog: str, protocol_help: str = "") -> argparse.ArgumentParser:
    """The launcher's own flags; everything else on the command line is the protocol's."""
    p = argparse.ArgumentParser(
        prog,
        add_help=True,
        description="Submits a job with submitit: one task per GPU, requeued on time-out or "
        "preemption.",
        epilog="Every other flag goes to the training run"
        + (f" (see `{protocol_help} --help`)" if protocol_help else "")
        + ": --config, --data_path, --output_dir, ...",
    )
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
        help="default: slurm; without Slurm (no sbatch) the launcher refuses unless local "
        "(tasks as processes here) or debug (in this process) is given",
    )
    return p


def checks_paths_here(args: argparse.Namespace) -> bool:
    """Whether the job runs on this machine (``--cluster local / debug``): its data and
    checkpoint paths are then checked before it starts, as a direct run checks them."""
    return args.cluster in ("local", "debug")


def parse_launcher(prog: str, argv, protocol_help: str = ""):
    """(launcher flags, the protocol's flags); impossible launcher values are refused here
    (argparse's exit code 2), not by submitit or Slurm after the submission."""
    p = launcher_parser(prog, protocol_help)
    args, rest = p.parse_known_args(argv)
    for flag in ("nodes", "ngpus", "timeout", "cpus_per_task"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.mem_gb_per_gpu < 0:  # 0: Slurm's --mem=0, all of a node's memory
        p.error(f"--mem_gb_per_gpu must be >= 0, got {args.mem_gb_per_gpu}")
    if args.cluster in ("local", "debug") and args.nodes > 1:
        p.error(f"--cluster {args.cluster} runs on this machine: one node, not {args.nodes}")
    return args, rest


class TrainingJob:
    """What submitit runs in each task: ``run(cfg)`` after joining the job's process group.

    On preemption or time-out it requeues itself with ``auto_resume`` on, after the trainer
    wrote ``checkpoint-last.pth`` (:mod:`.preemption`); the requeued job then resumes from
    whichever is further along, ``checkpoint-last.pth`` or the first ``--resume``.
    """

    def __init__(self, run: Callable[[Any], Any], cfg):
        self.run, self.cfg = run, cfg

    def __call__(self):
        set_dist_env()
        setup_logging(int(os.environ.get("RANK", 0)))
        signum = watch_requeue_signal()
        try:
            return self.run(self.cfg)
        except PreemptionStop as e:  # the checkpoint is written: submitit requeues (rank 0)
            if int(os.environ.get("RANK", 0)) == 0:
                logging.getLogger(__name__).warning("%s", e)
            preemption.hand_over(signum)  # (also when only another task got the signal)
            return None

    def checkpoint(self):
        import submitit

        cfg = dataclasses.replace(self.cfg, auto_resume=True)
        return submitit.helpers.DelayedSubmission(TrainingJob(self.run, cfg))


def watch_requeue_signal():
    """The signal submitit requeues on (USR2 unless configured) asks the trainer to write a
    checkpoint first (:mod:`.preemption`); returns it. A no-op (None) outside a submitit job
    and in the debug executor (this very process, which nothing signals)."""
    import submitit
    from submitit.core.job_environment import JobEnvironment

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:
        return None
    if env.name() == "debug":
        return None
    signum = JobEnvironment._usr_sig()
    preemption.install(signum)
    return signum


def set_dist_env() -> None:
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


def executor_parameters(args: argparse.Namespace, name: str) -> dict:
    params = dict(
        nodes=args.nodes,
        tasks_per_node=args.ngpus,
        gpus_per_node=args.ngpus,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb_per_gpu * args.ngpus,
        timeout_min=args.timeout,
        name=name,
        slurm_signal_delay_s=120,
    )
    extra = {k: getattr(args, k) for k in ("partition", "account", "qos", "constraint")}
    params.update({f"slurm_{k}": v for k, v in extra.items() if v})
    return params


def submit(cfg, run: Callable[[Any], Any], args: argparse.Namespace, name: str) -> int:
    """Submits ``run(cfg)`` as a job (the config was validated, paths aside, by the caller)."""
    import submitit

    job_dir = args.job_dir or os.path.join(cfg.output_dir, "submitit")
    executor = submitit.AutoExecutor(folder=job_dir, cluster=args.cluster, slurm_max_num_timeout=30)
    if args.cluster is None and executor.cluster != "slurm":  # (submitit would run it here)
        raise ConfigError(
            "no Slurm here (sbatch not found): submit from a Slurm login node, or try the "
            "set-up on this machine with --cluster local (the tasks as processes here, one "
            "node) or --cluster debug (in this process)"
        )
    params = executor_parameters(args, name)
    if executor.cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor.update_parameters(**params)
    job = executor.submit(TrainingJob(run, cfg))
    print(f"submitted job {job.job_id}; logs in {job_dir}")
    if executor.cluster == "debug":
        job.result()
    return 0
