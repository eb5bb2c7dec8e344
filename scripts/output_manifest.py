"""Every output byte of the tiny demo, as a manifest: the check that a refactor changed no output.

    python scripts/output_manifest.py --workdir /tmp/before --out before.txt   # runs `cortex.demo --tiny` there
    ... refactor ...
    python scripts/output_manifest.py --workdir /tmp/after --out after.txt
    python scripts/output_manifest.py --compare before.txt after.txt            # exit 1 on any difference

The manifest lists ``sha256  path`` of every file the tiny demo writes (datasets, checkpoints, TIS files,
statistics, significance tests, evaluation CSVs, figures, the report), relative to ``--workdir``, sorted.
Left out are the files that differ between two runs of the *same* code on the same machine: run records
(``*args*.json``: times and paths), training logs named by the minute, Lightning's resumable checkpoints, the
loss-curve figures and the evaluators' weights and timing table (wall-clock fields). Two runs of one commit
give the same manifest on one machine (checked when this script was written); compare manifests from one
machine only: another CPU make rounds differently.
"""
import argparse
import hashlib
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOLATILE = re.compile(r"(args[^/]*\.json$|/logs/training_log_[^/]*$|/lightning/[^/]*\.ckpt$|/loss_curves\.png$"
                      r"|/checkpoints/evaluators/[^/]*\.pth$|/checkpoints/evaluators/evaluators\.csv$|\.lock$)")


def manifest(workdir: Path) -> list[str]:
    """``sha256  relative/path`` lines of the non-volatile files under ``workdir``, sorted by path."""
    lines = []
    for f in sorted(p for p in workdir.rglob("*") if p.is_file()):
        rel = f.relative_to(workdir).as_posix()
        if not VOLATILE.search("/" + rel):
            lines.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {rel}")
    return lines


def compare(a: Path, b: Path) -> int:
    """Print the paths whose bytes differ or that only one manifest lists; 1 if any, else 0."""
    def read(p):
        return dict(reversed(line.split("  ", 1)) for line in p.read_text().splitlines() if line)

    x, y = read(a), read(b)
    diff = sorted(p for p in x.keys() | y.keys() if x.get(p) != y.get(p))
    for p in diff:
        print(f"{'changed' if p in x and p in y else 'only in ' + (str(a) if p in x else str(b))}: {p}")
    print(f"{len(diff)} of {len(x.keys() | y.keys())} files differ")
    return 1 if diff else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="run `python -m cortex.demo --tiny --workdir WORKDIR` (unless --no_run) and list its files")
    p.add_argument("--no_run", action="store_true", help="only list the files of an existing WORKDIR")
    p.add_argument("--out", help="write the manifest here (default: stdout)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two manifests; exit 1 on a difference")
    args = p.parse_args()
    if args.compare:
        return compare(Path(args.compare[0]), Path(args.compare[1]))
    if not args.workdir:
        p.error("give --workdir (or --compare A B)")
    work = Path(args.workdir).resolve()
    if not args.no_run:
        if work.exists() and any(work.iterdir()):
            p.error(f"--workdir {work} is not empty: give a fresh folder (or --no_run to list it)")
        subprocess.run([sys.executable, "-m", "cortex.demo", "--tiny", "--workdir", str(work)], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    text = "\n".join(manifest(work)) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
