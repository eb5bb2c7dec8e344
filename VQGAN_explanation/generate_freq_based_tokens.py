"""Frequency baseline (SPEC §1 step 5): the token ids occurring most often in each label's train images.

    cd VQGAN_explanation
    python generate_freq_based_tokens.py

Reads datasets/train_embeddings.csv; writes results/TIS/frequency_baseline/label_{k}.csv
(header Token,Count, top 100; ties: smaller token id first).
"""
import argparse

from cortex.cli import paths_parser
from cortex.data import read_split
from cortex.paths import ExperimentPaths
from cortex.stats import MAX_ROWS, frequency_baseline, write_frequency_baseline
from cortex.utils import save_run_args


def get_args_parser():
    p = argparse.ArgumentParser("generate_freq_based_tokens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, parents=[paths_parser()])
    p.add_argument("--split", default="train", help="split whose token counts are used (default: %(default)s)")
    p.add_argument("--max_rows", type=int, default=MAX_ROWS, help="tokens per label (default: %(default)s)")
    return p


def main(args, experiment="vqgan"):
    paths = ExperimentPaths.from_args(args, experiment)
    out_dir = paths.frequency_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_run_args(args, out_dir)
    baseline = frequency_baseline(read_split(paths.data_dir, args.split), limit=args.max_rows)
    files = write_frequency_baseline(out_dir, baseline)
    print(f"frequency baseline of {len(files)} labels -> {out_dir}")
    return files


if __name__ == "__main__":
    main(get_args_parser().parse_args())
