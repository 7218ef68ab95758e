"""`keel env [--json]`: the environment report to paste into a bug.

keel, Python, platform, torch and its CUDA/NCCL/cuDNN, the optional packages keel can use (found
through their installed metadata, never imported: importing deepspeed or vllm alone can take
seconds, probe the GPU or fail), the fetched corpora and model, and SLURM. torch is imported only
when the report is built, so importing this module stays cheap.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import sys
from collections import Counter

# Distribution name -> how it is installed with keel, mirroring setup.py (install_requires is
# "keel"; extras_require is "keel[extra]"). Empty: not a keel dependency, installed by hand.
OPTIONAL_PACKAGES = {
    "deepspeed": ["keel[dev]"],
    "torchao": ["keel[gpu]", "keel[dev]"],
    "transformer-engine": ["keel[gpu]"],
    "flash-attn": ["keel[gpu]"],
    "triton": ["keel[dev]"],
    "vllm": ["keel[rl]"],
    "faiss-cpu": ["keel"],
    "faiss-gpu": [],
    "reasoning-gym": ["keel[rl]", "keel[dev]"],
    "wandb": ["keel"],
    "megatron-core": ["keel"],
    "transformers": ["keel"],
    "matplotlib": ["keel"],
}
SLURM_COMMANDS = ("sbatch", "sinfo")

EPILOG = """examples:
  keel env                 a readable report, to paste into a bug report
  keel env --json          the same as one JSON object, for scripts"""


def package_version(dist_name: str):
    """The installed version of a distribution, or None, from its metadata alone."""
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def optional_packages() -> list[dict]:
    report = []
    for name, provided_by in OPTIONAL_PACKAGES.items():
        version = package_version(name)
        report.append({"name": name, "installed": version is not None, "version": version,
                       "provided_by": provided_by})
    return report


def torch_report() -> dict:
    try:
        import torch
    except ImportError as e:  # the report is most needed exactly when the install is broken
        return {"installed": False, "error": str(e)}
    cuda = torch.cuda.is_available()
    report = {"installed": True, "version": torch.__version__, "cuda_available": cuda,
              "cuda_version": torch.version.cuda, "devices": [], "nccl_version": None,
              "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if cuda:
        report["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            nccl = torch.cuda.nccl.version()
            report["nccl_version"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except (AttributeError, RuntimeError):  # a build without NCCL (Windows, some ROCm wheels)
            pass
    return report


def assets_report() -> dict:
    from keel.data.assets import FETCHERS, asset_path, keel_home
    from keel.errors import MissingAssetError

    assets = {}
    for name in sorted(FETCHERS):
        try:
            assets[name] = {"present": True, "path": str(asset_path(name))}
        except MissingAssetError:  # not fetched, or a fetch that never completed
            assets[name] = {"present": False, "path": str(keel_home() / name)}
    return {"keel_home": str(keel_home()), "keel_home_from_env": "KEEL_HOME" in os.environ,
            "assets": assets}


def slurm_report() -> dict:
    return {**{cmd: shutil.which(cmd) for cmd in SLURM_COMMANDS},
            "SLURM_CONF": os.environ.get("SLURM_CONF")}


def collect() -> dict:
    import keel

    return {
        "keel": {"version": keel.__version__, "path": os.path.dirname(os.path.abspath(keel.__file__))},
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "torch": torch_report(),
        "packages": optional_packages(),
        **assets_report(),
        "slurm": slurm_report(),
    }


def format_report(env: dict) -> str:
    t = env["torch"]
    lines = [f"keel        {env['keel']['version']} ({env['keel']['path']})",
             f"python      {env['python']['version']} ({env['python']['executable']})",
             f"platform    {env['platform']}"]
    if not t["installed"]:
        lines.append(f"torch       not importable: {t['error']}")
    else:
        lines.append(f"torch       {t['version']}")
        if t["cuda_available"]:
            devices = ", ".join(f"{n} x{c}" for n, c in Counter(t["devices"]).items())
            lines.append(f"  cuda      {t['cuda_version']}: {len(t['devices'])} device(s): {devices}")
            lines.append(f"  nccl      {t['nccl_version'] or 'not available'}")
        else:
            built = f"built for CUDA {t['cuda_version']}" if t["cuda_version"] else "CPU build"
            lines.append(f"  cuda      not available ({built})")
        lines.append(f"  cudnn     {t['cudnn_version'] or 'not available'}")
    lines.append("packages (installed by):")
    for pkg in env["packages"]:
        state = pkg["version"] if pkg["installed"] else "not installed"
        source = " or ".join(pkg["provided_by"]) or "not a keel dependency"
        lines.append(f"  {pkg['name']:<20} {state:<16} {source}")
    origin = "KEEL_HOME" if env["keel_home_from_env"] else "default; set KEEL_HOME to move it"
    lines.append(f"assets in {env['keel_home']} ({origin}):")
    for name, asset in env["assets"].items():
        state = f"present  {asset['path']}" if asset["present"] else f"missing: run `keel fetch {name}`"
        lines.append(f"  {name:<12} {state}")
    slurm = env["slurm"]
    lines.append("slurm:")
    for cmd in SLURM_COMMANDS:
        lines.append(f"  {cmd:<11} {slurm[cmd] or 'not on PATH'}")
    lines.append(f"  SLURM_CONF  {slurm['SLURM_CONF'] or 'unset'}")
    return "\n".join(lines)


def cmd_env(args) -> None:
    env = collect()
    print(json.dumps(env, indent=2) if args.json else format_report(env))


def add_parser(sub, parser_class) -> None:
    """`keel env` under the CLI's subcommands."""
    p = sub.add_parser("env", help="print the environment report to paste into a bug report",
                       description="Report keel, Python, torch/CUDA, optional packages, fetched "
                                   "assets and SLURM.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true",
                   help="print the report as one JSON object instead of text (default: text)")
    p.set_defaults(fn=cmd_env)
