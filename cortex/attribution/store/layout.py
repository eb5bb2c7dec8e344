"""The names of a TIS folder's files (label file, partial, side-car, lock), the run id, and the hashes and short
lists the store's messages use. The format is specified in :mod:`cortex.attribution.store`."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

TIS_HEADER = ["filename", "label", "contribution"]
N_POS = 256  # scores per row for the paper's 16x16 grid; another tokenizer's files hold h*w (tis_row_length)
FORMAT_VERSION = 2
TIS_CONFIG = "tis_config.json"


# ----------------------------------------------------------------------------- names, side-cars, run ids

def run_id_of(key: dict) -> str:
    """16 hex digits of the sha256 of the canonical JSON of a run key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tis_file(out_dir, label: int) -> Path:
    return Path(out_dir) / f"label_{label}.csv"


def partial_file(out_dir, label: int) -> Path:
    return Path(out_dir) / f"label_{label}.csv.partial"


def sidecar_file(out_dir, label: int) -> Path:
    return Path(out_dir) / f"label_{label}.csv.run.json"


def lock_file(out_dir, label: int) -> Path:
    return Path(out_dir) / f"label_{label}.csv.lock"


def read_sidecar(out_dir, label: int) -> dict | None:
    p = sidecar_file(out_dir, label)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _diff(old: dict | None, new: dict) -> dict:
    """``{key: (stored, requested)}`` of the keys whose values differ."""
    old = old or {}
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k != "run_id" and old.get(k) != new.get(k)}


# ----------------------------------------------------------------------------- hashes and messages

def file_sha1(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def short_list(items, n: int = 10) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def fingerprint(path: Path) -> str:
    """Cheap content fingerprint of a (large) TIS file: size + SHA-1 of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), 2)
            h.update(f.read())
    return h.hexdigest()
