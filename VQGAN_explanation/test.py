"""Top-1/3/5/10 accuracy of a trained IEM on the test split (a top-k with k above the number of classes is
printed as n/a).

    python test.py --model 1 --gpu 0

Writes results/Classification/ClassificationNet{m}/testing_results.csv.
"""
import argparse

from cortex.cli import data_parser, make_parser, model_parser, paths_parser, positive_int, run_main, runtime_parser
from cortex.iem.registry import model_choices
from cortex.paths import ExperimentPaths
from cortex.provenance import verify, write_output_record
from cortex.iem.testing import test_iem, topk_line, write_csv_row
from cortex.utils import save_run_args

EXPERIMENT = "vqgan"
KS = (1, 3, 5, 10)


def get_args_parser():
    p = make_parser("Test an IEM (VQGAN)", parents=[model_parser(model_choices("vqgan")), paths_parser(__file__),
                                                                  runtime_parser(), data_parser()],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch_size", type=positive_int, default=512, help="test batch size")
    return p


def main(args):
    paths = ExperimentPaths.from_args(args, EXPERIMENT)
    out = paths.testing_results(args.model)
    save_run_args(args, out.parent, "test_args.json")
    used = verify(paths, args.model, split="test")  # the checkpoint was trained on this dataset (refused if not)
    acc = test_iem(args, paths, EXPERIMENT, KS)
    write_csv_row(out, [f"Top-{k} Accuracy" for k in KS], [acc[k] for k in KS])  # full precision, as the authors
    write_output_record(out, used)  # the checkpoint and dataset tested (cortex.provenance)
    print(topk_line(acc, KS))  # the CSV keeps the authors' four columns (k above the classes: 100%)
    print(f"wrote {out}")
    return acc


if __name__ == "__main__":
    run_main(main, get_args_parser)
