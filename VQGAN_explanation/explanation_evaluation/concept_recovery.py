"""Concept recovery on the synthetic world: precision@k of the planted concept tokens (SPEC §6).

    cd VQGAN_explanation/explanation_evaluation
    python concept_recovery.py                 # every model and attribution with TIS statistics
    python concept_recovery.py --model 1 --k 5

For each label, the planted concept tokens come from datasets/ground_truth.json (written by
generate_dataset.py). Compared: the first k tokens of each attribution's `Top n Tokens` section
(n = 1, 5, 10, 20), the frequency baseline (results/TIS/frequency_baseline), and random choice
(expected precision of k ids drawn from those occurring in the label's train images).
k defaults to the number of planted tokens of each label. Writes results/Explanation/concept_recovery.csv
(columns model,method,top_n,label,k,precision; rows with label "mean" average over labels).
"""
import argparse
import csv

from cortex.cli import paths_parser
from cortex.paths import ExperimentPaths
from cortex.stats import TOP_NS, concept_recovery
from cortex.utils import atomic_write, save_run_args

COLUMNS = ["model", "method", "top_n", "label", "k", "precision"]


def get_args_parser():
    p = argparse.ArgumentParser("concept_recovery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[paths_parser(root_default="..")])
    p.add_argument("--model", type=int, nargs="*", default=None, help="IEMs to evaluate (default: all found)")
    p.add_argument("--k", type=int, default=None, help="precision@k (default: number of planted tokens per label)")
    p.add_argument("--top_ns", type=int, nargs="+", default=list(TOP_NS), help="sections to evaluate")
    return p


def format_summary(summary) -> str:
    lines = [f"{'model':>5}  {'method':<22} {'top_n':>5} {'k':>7} {'precision@k':>11}  labels"]
    for r in summary:
        lines.append(f"{str(r['model']):>5}  {r['method']:<22} {str(r['top_n']):>5} {str(r['k']):>7} "
                     f"{r['precision']:>11.3f}  {r['labels']}")
    return "\n".join(lines)


def main(args, experiment="vqgan"):
    paths = ExperimentPaths.from_args(args, experiment)
    out = paths.results_dir / "Explanation" / "concept_recovery.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_run_args(args, out.parent, name="concept_recovery_args.json")
    rows, summary = concept_recovery(paths, models=args.model, k=args.k, top_ns=tuple(args.top_ns))
    print(format_summary(summary))
    with atomic_write(out) as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows + summary:
            w.writerow([r[c] if not isinstance(r[c], float) else f"{r[c]:.6f}" for c in COLUMNS])
    print(f"-> {out}")
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
