"""Who am I: rank and world size from torchrun or SLURM, the device, process-group setup, and the
preemption signals (SIGUSR1 / SIGTERM) that make the trainer checkpoint and stop.

Rank discovery, in order:
  1. torchrun (or anything else that sets RANK and WORLD_SIZE): used as is.
  2. `srun` without torchrun (one task per GPU): SLURM_PROCID / SLURM_STEP_NUM_TASKS /
     SLURM_LOCALID of the job step; the first node of the step hosts the rendezvous
     (MASTER_ADDR, or that node's address; MASTER_PORT, or a port derived from the job id).
     Only inside an srun step (SLURM_STEP_ID set): the batch script itself also carries
     SLURM_PROCID=0 and the job's SLURM_NTASKS, and treating it as rank 0 of N would hang.
  3. Otherwise one process.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from keel.errors import KeelError

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class RankEnv:
    """Where this process's rank came from, and the env:// rendezvous it implies."""
    source: str  # "torchrun", "slurm" or "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


def slurm_rendezvous_port(job_id: str) -> int:
    """The same port on every task of a job, different for jobs sharing a node (fake clusters)."""
    return 20000 + int(job_id) % 20000


def _scontrol(*args: str) -> str:
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KeelError(f"SLURM rank discovery: `scontrol {' '.join(args)}` failed ({e}); "
                        f"set MASTER_ADDR to the first node's address") from None


def slurm_head_address(nodelist: str) -> str:
    """The address of the first node of a SLURM node list such as `gpu[003-004,010]`: its host
    name where that resolves (real clusters; `scontrol show hostnames` needs no slurmctld), else
    its NodeAddr (the fake nodes of slurm/local_cluster.sh are all 127.0.0.1)."""
    head = _scontrol("show", "hostnames", nodelist).split()[0]
    try:
        socket.getaddrinfo(head, None)
        return head
    except OSError:
        pass
    for field in _scontrol("show", "node", head, "-o").split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return head


def discover_ranks(env=None, resolve_head=slurm_head_address) -> RankEnv:
    """Rank, world size and rendezvous from torchrun's or SLURM's environment (see module doc)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankEnv("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1:
        addr = env.get("MASTER_ADDR") or resolve_head(env["SLURM_STEP_NODELIST"])
        port = int(env.get("MASTER_PORT") or slurm_rendezvous_port(env["SLURM_JOB_ID"]))
        return RankEnv("slurm", int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]),
                       int(env.get("SLURM_LOCALID", 0)), addr, port)
    return RankEnv("single", 0, 1, 0)


def init_distributed() -> DistInfo:
    ranks = discover_ranks()
    if ranks.source == "slurm":  # what torchrun would have set, so init_process_group("env://") works
        os.environ.update(RANK=str(ranks.rank), WORLD_SIZE=str(ranks.world_size),
                          LOCAL_RANK=str(ranks.local_rank), MASTER_ADDR=ranks.master_addr,
                          MASTER_PORT=str(ranks.master_port))
    if torch.cuda.is_available():
        # srun --gpus-per-task shows each task only its own GPU: local rank 1 is then device 0.
        device = torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if ranks.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    preemption_flag().install()
    return DistInfo(ranks.rank, ranks.world_size, ranks.local_rank, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- preemption

class PreemptionFlag:
    """Set by SIGUSR1 or SIGTERM (SLURM: `sbatch --signal=USR1@120`, preemption, scancel).

    The handler only records the signal; the trainer polls `requested()` once per step, a
    collective that returns True on every rank as soon as any rank got a signal, so all ranks
    stop after the same step and save one checkpoint together. A second SIGTERM while the flag
    is already set terminates at once, for a process that never polls.
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self._installed = False

    @property
    def signal_name(self) -> Optional[str]:
        return None if self.signum is None else signal.Signals(self.signum).name

    def install(self) -> None:
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)
        self._installed = True

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGTERM and self.signum is not None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.signum is None and os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"keel: got {signal.Signals(signum).name}: checkpointing after this step, then exiting\n")
        self.signum = self.signum or signum

    # Polling is split in two so that the trainer can fold the answer into its step's one host
    # sync: poll() starts the all-reduce (MAX over all ranks) and returns its device tensor,
    # settle() takes the value read back.
    agreed: int = 0
    settled: bool = False

    def poll(self, device: torch.device) -> torch.Tensor:
        """Has any rank been signalled? Call on every rank at the same point."""
        flag = torch.tensor([0 if self.signum is None else int(self.signum)], dtype=torch.int64, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag[0]

    def settle(self, agreed: int) -> None:
        if self.signum is None and agreed:
            self.signum = agreed  # the signal another rank got
        self.agreed, self.settled = agreed, True

    def requested(self, device: torch.device) -> bool:
        """poll + settle in one call (a blocking read)."""
        self.settle(int(self.poll(device).item()))
        return self.agreed != 0


_PREEMPTION = PreemptionFlag()


def preemption_flag() -> PreemptionFlag:
    """The process's preemption flag (signal handlers are process-wide, so there is one)."""
    return _PREEMPTION
