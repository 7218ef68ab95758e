"""Every GPU path of keel once, on one H100/H200, in under 9 minutes: gpu_suite.json + gpu_suite.md.

    python bench/gpu_suite.py                          # all sections, results in ./gpu_suite_out
    python bench/gpu_suite.py --only ksa_kernel,decode --out /tmp/suite
    python bench/gpu_suite.py --dry-run                # CPU: list sections, import what each needs

Sections (bench/gpu_suite_sections.py): train_bf16, document_attention, fp8, compile,
seed_init_fsdp, ksa_kernel, decode. Each runs in its own child process with a time cap (a hung
compile or a CUDA fault ends that section only) and is recorded as ok / failed / skipped with a
one-line error; every timing is a fixed number of steps after warm-up. The suite stops starting
sections once --budget seconds are spent (the rest are recorded as skipped). Child logs go to
OUT/logs/SECTION.log; scratch files (GBs: seed checkpoints) go to --work, not OUT. `--tiny` shrinks every shape to smoke-run the code on CPU (numbers meaningless).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # gpu_suite_sections, train_throughput
sys.path.insert(1, str(HERE.parent))  # keel from this checkout
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")

from gpu_suite_sections import SECTIONS

# Cheap, independent sections first, compile-heavy ones last: a spent budget then costs the least.
RUN_ORDER = ["train_bf16", "document_attention", "ksa_kernel", "decode", "seed_init_fsdp", "compile", "fp8"]
assert sorted(RUN_ORDER) == sorted(SECTIONS)
MIN_SECTION_S = 25  # do not start a section with less time than this left


def one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def header() -> dict:
    import torch

    def version(name):  # from package metadata: importing torchao alone prints warnings
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    gpu = torch.cuda.is_available()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                                cwd=HERE.parent).stdout.strip() or None
    except OSError:
        commit = None
    return {"device": torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()})",
            "cuda": torch.version.cuda if gpu else None, "torch": torch.__version__, "triton": version("triton"),
            "transformers": version("transformers"), "torchao": version("torchao"), "python": platform.python_version(),
            "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]), "keel_commit": commit}


def check_imports(specs: list[str]) -> list[str]:
    """The `module:attr,attr` specs that fail to import, each with its one-line reason."""
    failed = []
    for spec in specs:
        module, _, attrs = spec.partition(":")
        try:
            mod = importlib.import_module(module)
            for attr in filter(None, attrs.split(",")):
                if not hasattr(mod, attr):
                    raise ImportError(f"cannot import name {attr!r} from {module!r}")
        except Exception as e:  # noqa: BLE001 - any import error is what the dry run reports
            failed.append(f"{module}: {type(e).__name__}: {one_line(str(e))}")
    return failed


def dry_run(names: list[str]) -> int:
    bad = []
    print(f"gpu_suite dry run: {len(names)} sections (run order {', '.join(n for n in RUN_ORDER if n in names)})")
    for name in names:
        _, what, imports, cap = SECTIONS[name]
        failed = check_imports(imports)
        print(f"[{name}] {'imports ok' if not failed else 'IMPORT FAILED'} (cap {cap} s)\n  would run: {what}")
        for f in failed:
            print(f"  failed import: {f}")
        bad += [name] * bool(failed)
    if bad:
        print(f"dry run: imports failed in {', '.join(bad)}")
    else:
        print("dry run: every import succeeded")
    return 1 if bad else 0


def child(name: str, args) -> None:
    """Run one section in this process and write its result JSON (called by run_section)."""
    if args.tiny and not os.path.exists("/dev/nvidia0"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel's triton import
    from gpu_suite_sections import Ctx, Skip
    from gpu_suite_sections import one_line as exc_line
    prior = json.loads(Path(args.prior).read_text()) if args.prior and Path(args.prior).is_file() else {}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(out=work, tiny=args.tiny, synthetic=args.synthetic_data, prior=prior.get("sections", {}))
    t0 = time.perf_counter()
    try:
        result = {"status": "ok", "error": "", **SECTIONS[name][0](ctx)}
    except Skip as e:
        result = {"status": "skipped", "error": str(e)}
    except Exception as e:  # noqa: BLE001 - a section's failure is recorded, never fatal
        import traceback
        traceback.print_exc()
        result = {"status": "failed", "error": exc_line(e)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))


def run_section(name: str, args, timeout: float, prior_path: Path) -> dict:
    out = Path(args.out)
    result_path, log_path = out / "logs" / f"{name}.json", out / "logs" / f"{name}.log"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--result", str(result_path),
           "--out", str(out), "--work", args.work, "--prior", str(prior_path)] + ["--tiny"] * args.tiny + ["--synthetic-data"] * args.synthetic_data
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the child and anything it started (compile workers)
            proc.wait()
            return {"status": "failed", "error": f"timed out after {timeout:.0f} s (log: {log_path})",
                    "seconds": round(time.perf_counter() - t0, 1)}
    if result_path.is_file():
        return json.loads(result_path.read_text())
    return {"status": "failed", "error": f"child exited {proc.returncode}: {one_line(log_path.read_text())}",
            "seconds": round(time.perf_counter() - t0, 1)}


def markdown(report: dict) -> str:
    h = report["header"]
    lines = [f"# keel GPU suite — {h['device']}", "",
             (f"{h['date_utc']}; torch {h['torch']} (CUDA {h['cuda']}), triton {h['triton']}, transformers "
             f"{h['transformers']}, torchao {h['torchao']}; keel {h['keel_commit']}"), "",
             f"Command: `{h['command']}`; total wall time {report['total_s']:.0f} s", "",
             "| section | status | result | s |", "|---|---|---|---|"]
    for name, r in report["sections"].items():
        text = r.get("summary") if r["status"] == "ok" else r.get("error", "")
        lines.append(f"| {name} | {r['status']} | {str(text).replace('|', '/')} | {r.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="./gpu_suite_out", help="folder for gpu_suite.json, gpu_suite.md, logs/")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "keel_gpu_suite"),
                   help="scratch folder: synthetic data, run folders, seed checkpoints (GBs); default %(default)s")
    p.add_argument("--dry-run", action="store_true", help="list the sections and import what each needs (CPU)")
    p.add_argument("--budget", type=float, default=500, help="seconds for the whole suite (sections get what is left)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, to smoke-run the code on CPU")
    p.add_argument("--synthetic-data", action="store_true", help="synthetic data even where real corpora exist")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--prior", help=argparse.SUPPRESS)
    args = p.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(unknown)}; expected some of {', '.join(SECTIONS)}")
    if args.child:
        child(args.child, args)
        return 0
    if args.dry_run:
        return dry_run(names)

    start = time.perf_counter()
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    report = {"header": header(), "sections": {}, "total_s": 0.0}
    print(json.dumps(report["header"], indent=1), flush=True)
    json_path = out / "gpu_suite.json"
    for name in (n for n in RUN_ORDER if n in names):
        left = args.budget - (time.perf_counter() - start)
        cap = SECTIONS[name][3] * (4 if args.tiny else 1)
        if left < MIN_SECTION_S:
            result = {"status": "skipped", "error": f"suite budget of {args.budget:.0f} s spent ({left:.0f} s left)"}
        else:
            print(f"[{name}] running (up to {min(cap, left):.0f} s) ...", flush=True)
            result = run_section(name, args, min(cap, left), json_path)
        report["sections"][name] = result
        print(f"[{name}] {result['status']} in {result.get('seconds', 0)} s: "
              f"{result.get('summary') or result.get('error')}", flush=True)
        report["total_s"] = round(time.perf_counter() - start, 1)
        json_path.write_text(json.dumps(report, indent=1, default=str))  # partial results survive a kill
    report["sections"] = {n: report["sections"][n] for n in SECTIONS if n in report["sections"]}  # listed order
    report["total_s"] = round(time.perf_counter() - start, 1)
    json_path.write_text(json.dumps(report, indent=1, default=str))
    table = markdown(report)
    (out / "gpu_suite.md").write_text(table)
    print("\n" + table)
    return 0 if all(r["status"] != "failed" for r in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
