"""`keel slurm submit RECIPE --nodes N --gpus-per-node G ...`: render an sbatch script from
keel/cli/templates/train.sbatch.j2 (or rl.sbatch.j2 for a recipe with an `rl:` section) and submit it.

Everything that can be checked before the job waits in a queue is checked here: the flags, the
recipe (validated, then embedded resolved in the script), the world size against the recipe's
parallel layout and batch, and the partition (against `sinfo`). Per job, the log directory
(default `<run.out_dir>/slurm`) gets `<name>-<jobid>.out` (the job's output, appended across
requeues), `<name>-<jobid>.config.yaml` (the resolved recipe the job trains from) and
`<name>-<jobid>.sbatch` (the script as submitted).

Templates use `{{ name }}` placeholders (a Jinja-compatible subset, rendered without Jinja).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from keel.errors import KeelError

# Package data (setup.py package_data), so a non-editable install can submit jobs too.
TEMPLATE_DIR = Path(os.environ.get("KEEL_SLURM_TEMPLATES", Path(__file__).resolve().parent / "templates"))
SIGNAL_SECONDS = 120  # SIGUSR1 this long before the time limit: time to finish a step and checkpoint
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_HEREDOC_END = "KEEL_CONFIG_EOF"


class SlurmError(KeelError):
    """A bad `keel slurm` flag, or SLURM itself refusing or missing."""


@dataclass
class JobRequest:
    recipe: str
    overrides: list[str]
    nodes: int
    gpus_per_node: int = 0
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    cpus_per_task: Optional[int] = None
    job_name: Optional[str] = None
    max_restarts: int = 3
    log_dir: Optional[str] = None


def render(template: str, values: dict) -> str:
    """Fill `{{ name }}` placeholders; a placeholder without a value is an error, not a blank."""
    def fill(match):
        key = match.group(1)
        if key not in values:
            raise SlurmError(f"template placeholder {{{{ {key} }}}} has no value")
        return str(values[key])
    return _PLACEHOLDER.sub(fill, template)


def _check_flags(req: JobRequest) -> None:
    if req.nodes < 1:
        raise SlurmError(f"--nodes: must be at least 1, got {req.nodes}")
    if req.gpus_per_node < 0:
        raise SlurmError(f"--gpus-per-node: must be 0 (CPU, gloo) or more, got {req.gpus_per_node}")
    if req.max_restarts < 0:
        raise SlurmError(f"--max-restarts: must be 0 or more, got {req.max_restarts}")
    if req.cpus_per_task is not None and req.cpus_per_task < 1:
        raise SlurmError(f"--cpus-per-task: must be at least 1, got {req.cpus_per_task}")
    if req.time is not None and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}|(?i:unlimited|infinite)", req.time):
        raise SlurmError(f"--time: expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]], got {req.time!r}")


def _load_config(req: JobRequest, world_size: int):
    """The validated Config, its kind (train | rl), checked against the job's world size."""
    import keel
    from keel.config import load_raw
    from keel.train.parallel import resolve_parallel_dims

    kind = "rl" if "rl" in load_raw(Path(req.recipe)) else "train"
    cfg = keel.load_recipe(req.recipe, req.overrides)
    dims = resolve_parallel_dims(cfg.parallel, world_size)  # ConfigError naming the layout if it cannot fit
    micro_total = cfg.train.micro_batch * dims.dp
    if cfg.train.global_batch % micro_total:
        raise SlurmError(f"train.global_batch: {cfg.train.global_batch} is not a multiple of train.micro_batch "
                         f"x data-parallel ranks = {micro_total} on {world_size} ranks "
                         f"(--nodes {req.nodes} x {max(req.gpus_per_node, 1)} per node)")
    return cfg, kind


def partitions() -> list[str]:
    """The cluster's partitions, from `sinfo` (the default one is listed without its `*`)."""
    out = _run(["sinfo", "-h", "-o", "%P"]).stdout
    return list(dict.fromkeys(p.rstrip("*") for p in out.split()))


def _run(cmd: list[str], input: Optional[str] = None) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"`{cmd[0]}` not found: run this on a SLURM login node, or start the local cluster "
                         f"(bash slurm/local_cluster.sh start; export SLURM_CONF=...)")
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        msg = " ".join(proc.stderr.split()) or f"exit code {proc.returncode}"
        raise SlurmError(f"{cmd[0]} failed: {msg}")
    return proc


def _check_partition(partition: str, dry_run: bool) -> None:
    try:
        known = partitions()
    except SlurmError as e:
        if not dry_run:
            raise
        sys.stderr.write(f"keel: warning: --partition {partition} not checked ({e})\n")
        return
    for name in partition.split(","):  # SLURM takes a list: the first that can run the job
        if name not in known:
            raise SlurmError(f"--partition: unknown partition {name!r}; this cluster has: {', '.join(known) or 'none'}")


def _job_name(req: JobRequest, cfg) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", req.job_name or cfg.run.name) or "keel"


def _directives(req: JobRequest, name: str, log_dir: Path, workdir: Path) -> str:
    options = [f"--job-name={name}", f"--nodes={req.nodes}", "--ntasks-per-node=1"]
    if req.gpus_per_node:
        options.append(f"--gpus-per-node={req.gpus_per_node}")
    if req.cpus_per_task:
        options.append(f"--cpus-per-task={req.cpus_per_task}")
    for flag in ("partition", "time", "account", "qos"):
        if getattr(req, flag):
            options.append(f"--{flag}={getattr(req, flag)}")
    options += [f"--chdir={workdir}", f"--output={log_dir}/%x-%j.out", "--open-mode=append",
                "--requeue", f"--signal=USR1@{SIGNAL_SECONDS}"]
    return "\n".join(f"#SBATCH {opt}" for opt in options)


def build_script(req: JobRequest, dry_run: bool = False) -> tuple[str, Path, str]:
    """(sbatch script, log directory, job name) for a request, after every check."""
    _check_flags(req)
    world_size = req.nodes * max(req.gpus_per_node, 1)
    cfg, kind = _load_config(req, world_size)
    if req.partition:
        _check_partition(req.partition, dry_run)
    if cfg.checkpoint.resume == "never":
        sys.stderr.write("keel: warning: checkpoint.resume is 'never': a requeued or restarted job starts over\n")
    elif not cfg.checkpoint.every:
        sys.stderr.write("keel: warning: checkpoint.every is 0: a restart after a crash starts from step 0 "
                         "(a preemption still checkpoints first)\n")
    workdir = Path.cwd()
    run_dir = (workdir / cfg.run.out_dir).resolve()
    log_dir = Path(req.log_dir).resolve() if req.log_dir else run_dir / "slurm"
    name = _job_name(req, cfg)
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip("\n")
    if _HEREDOC_END in config_yaml:
        raise SlurmError(f"the recipe contains the text {_HEREDOC_END}, which ends the config inside the job script")
    template_path = TEMPLATE_DIR / f"{kind}.sbatch.j2"
    if not template_path.is_file():
        raise SlurmError(f"{template_path}: sbatch template not found (set KEEL_SLURM_TEMPLATES to the slurm/ folder)")
    command = ["keel", "slurm", "submit", req.recipe, f"--nodes={req.nodes}", f"--gpus-per-node={req.gpus_per_node}"]
    for flag in ("partition", "time", "account", "qos", "cpus_per_task", "job_name", "log_dir"):
        if getattr(req, flag) is not None:
            command.append(f"--{flag.replace('_', '-')}={getattr(req, flag)}")
    command += [f"--max-restarts={req.max_restarts}", *req.overrides]
    script = render(template_path.read_text(), {
        "sbatch_directives": _directives(req, name, log_dir, workdir),
        "submit_command": shlex.join(command), "python": shlex.quote(sys.executable),
        "run_dir": shlex.quote(str(run_dir)), "log_dir": shlex.quote(str(log_dir)),
        "nproc_per_node": max(req.gpus_per_node, 1), "max_restarts": req.max_restarts,
        "signal_seconds": SIGNAL_SECONDS, "config_yaml": config_yaml,
    })
    return script, log_dir, name


def submit(req: JobRequest, dry_run: bool = False) -> Optional[str]:
    """Submit the job (or print its script with dry_run); return the job id."""
    script, log_dir, name = build_script(req, dry_run)
    if dry_run:
        sys.stdout.write(script)
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    job_id = _run(["sbatch", "--parsable"], input=script).stdout.strip().split(";")[0]
    (log_dir / f"{name}-{job_id}.sbatch").write_text(script)
    print(f"keel: submitted job {job_id}: {req.nodes} node(s) x {max(req.gpus_per_node, 1)} process(es)\n"
          f"  log:     {log_dir}/{name}-{job_id}.out\n"
          f"  config:  {log_dir}/{name}-{job_id}.config.yaml (written when the job starts)\n"
          f"  script:  {log_dir}/{name}-{job_id}.sbatch\n"
          f"  watch:   squeue -j {job_id}   |   stop: scancel {job_id}   |   checkpoint and requeue: "
          f"scancel --signal=USR1 {job_id}")
    return job_id


def cmd_submit(args) -> None:
    submit(JobRequest(recipe=args.recipe, overrides=args.overrides, nodes=args.nodes,
                      gpus_per_node=args.gpus_per_node, partition=args.partition, time=args.time,
                      account=args.account, qos=args.qos, cpus_per_task=args.cpus_per_task,
                      job_name=args.job_name, max_restarts=args.max_restarts, log_dir=args.log_dir),
           dry_run=args.dry_run)


def add_parser(sub, parser_class) -> None:
    """`keel slurm submit ...` under the CLI's subcommands."""
    class SubmitParser(parser_class):
        """Takes key=value overrides after the flags too (`... --nodes 2 train.steps=5`)."""
        def parse_known_args(self, args=None, namespace=None):
            namespace, extra = super().parse_known_args(args, namespace)
            late = [a for a in extra if "=" in a and not a.startswith("-")]
            if late and hasattr(namespace, "overrides"):
                namespace.overrides = list(namespace.overrides or []) + late
                extra = [a for a in extra if a not in late]
            return namespace, extra

    slurm = sub.add_parser("slurm", help="run on a SLURM cluster").add_subparsers(
        dest="slurm_command", required=True, parser_class=SubmitParser)
    s = slurm.add_parser("submit", help="render an sbatch script for a recipe and submit it",
                         epilog="examples:\n  keel slurm submit recipes/lm/llama-1b-h100.yaml --nodes 4 --gpus-per-node 8 "
                                "--partition gpu --time 24:00:00\n  keel slurm submit recipes/lm/tiny.yaml --nodes 2 "
                                "--dry-run   # print the script only", formatter_class=parser_class.formatter)
    s.add_argument("recipe", help="a YAML recipe (an rl: section submits `keel rl`)")
    s.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    s.add_argument("--nodes", type=int, required=True, help="nodes; one torchrun per node")
    s.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs (= trainer processes) per node; 0: one CPU process (gloo) (default: 0)")
    s.add_argument("--partition", help="SLURM partition(s), checked against sinfo (default: the cluster's)")
    s.add_argument("--time", help="time limit, e.g. 4:00:00 or 2-00:00:00")
    s.add_argument("--account", help="SLURM account to charge (default: yours)")
    s.add_argument("--qos", help="SLURM quality of service (default: the account's)")
    s.add_argument("--cpus-per-task", type=int, help="CPUs for each node's task (all its processes)")
    s.add_argument("--job-name", help="default: run.name")
    s.add_argument("--max-restarts", type=int, default=3,
                   help="torchrun restarts after a failure, each resuming from the last checkpoint (default 3)")
    s.add_argument("--log-dir", help="default: <run.out_dir>/slurm")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")
    s.set_defaults(fn=cmd_submit)
