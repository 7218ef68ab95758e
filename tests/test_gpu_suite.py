"""bench/gpu_suite.py --dry-run on CPU: every section is listed and the keel modules each needs import."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ["train_bf16", "document_attention", "fp8", "compile", "seed_init_fsdp", "ksa_kernel", "decode"]


def test_dry_run_lists_and_imports_every_section():
    done = subprocess.run([sys.executable, str(REPO / "bench/gpu_suite.py"), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    out = done.stdout
    status = {}
    for line in out.splitlines():
        if line.startswith("[") and "] " in line:
            name, rest = line[1:].split("] ", 1)
            status[name] = rest
    assert list(status) == SECTIONS, out + done.stderr
    for name in SECTIONS:
        assert "would run:" in out.split(f"[{name}]", 1)[1], out
        assert status[name].startswith("imports ok"), f"{name}: {status[name]}\n{out}"
    assert done.returncode == 0, out + done.stderr
