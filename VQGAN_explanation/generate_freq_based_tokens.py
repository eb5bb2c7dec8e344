"""Frequency baseline (SPEC §1 step 5): the token ids occurring most often in each label's train images.

    cd VQGAN_explanation
    python generate_freq_based_tokens.py

Reads datasets/train_embeddings.csv; writes results/TIS/frequency_baseline/label_{k}.csv
(header Token,Count, top 100), byte-equal to the authors' script: counts over every position of the
label's rows in CSV order, ties in first-occurrence order (collections.Counter.most_common).
Labels are checked as the training reader checks them: an integer in 0..num_classes-1
(--num_classes, else datasets/dataset_info.json, else 1000).
Linear in the images: the CSV is parsed in one pass (cortex.data.list_csv.read_split_ids; the row-by-row reader
only for a malformed file, to name the line), counts by np.bincount; every label file is written
atomically (cortex.analysis.statistics_files.StagedFiles); results/TIS/frequency_baseline/source.json records the split CSV's
sha256 and the labels, and says "unfinished" while the files are written (cortex.provenance: a failed run
is refused by its consumers, not used). bench/bench_stats.py times it against a plain pandas version.
"""
import argparse

from cortex.analysis.frequency import frequency_baseline, write_frequency_baseline
from cortex.analysis.ranking import MAX_ROWS
from cortex.cli import int_in, make_parser, paths_parser, positive_int, run_main
from cortex.data.formats import resolve_num_classes
from cortex.data.list_csv import read_split_ids
from cortex.paths import ExperimentPaths, label_files
from cortex.provenance import begin_frequency_baseline, finish_frequency_baseline
from cortex.utils import save_run_args


def get_args_parser():
    p = make_parser("generate_freq_based_tokens", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter, parents=[paths_parser(__file__)])
    p.add_argument("--split", default="train", help="split whose token counts are used (default: %(default)s)")
    p.add_argument("--max_rows", type=positive_int, default=MAX_ROWS, help="tokens per label (default: %(default)s)")
    p.add_argument("--num_classes", type=int_in(2), default=None,
                   help="number of labels; a label outside 0..num_classes-1 is an error. Default: "
                        "datasets/dataset_info.json, else 1000")
    return p


def main(args, experiment="vqgan"):
    paths = ExperimentPaths.from_args(args, experiment)
    num_classes = resolve_num_classes(args.num_classes, paths.data_dir, 1000 if experiment == "vqgan" else 2)
    _, labels, ids = read_split_ids(paths.data_dir, args.split, num_classes)  # (N,), (N, 256)
    out_dir = paths.frequency_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_run_args(args, out_dir)
    begin_frequency_baseline(paths)  # source.json says "unfinished" until every file is written
    baseline = frequency_baseline((labels, ids), limit=args.max_rows)
    files = write_frequency_baseline(out_dir, baseline)
    for label, path in label_files(out_dir).items():
        if label not in baseline:
            path.unlink()  # an earlier dataset's label: not part of this baseline
    finish_frequency_baseline(paths, args.split, baseline)  # the split CSV's sha256 (cortex.provenance)
    print(f"frequency baseline of {len(files)} labels -> {out_dir}")
    return files


if __name__ == "__main__":
    run_main(main, get_args_parser)
