"""Accuracy of a trained bias IEM on the test split.

    cd Dalle_explanation
    python test.py --model 1 --bias_type doctor_gender

Reads checkpoints/{bias_type}/ClassificationNet{m}/best_model.pth (any of the three nets; width/depth from
its config.json) and writes results/{bias_type}/Classification/ClassificationNet{m}/testing_results.csv
(header ``Accuracy``, percent).
"""
import argparse

from cortex.cli import (bias_parser, data_parser, make_parser, model_parser, paths_parser, positive_int, run_main,
                        runtime_parser)
from cortex.iem.registry import model_choices
from cortex.paths import ExperimentPaths
from cortex.provenance import verify, write_output_record
from cortex.iem.testing import test_iem, write_csv_row
from cortex.utils import save_run_args

EXPERIMENT = "dalle"


def get_args_parser():
    p = make_parser("Test an IEM (DALL-E-mini bias)", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[model_parser(model_choices("dalle")), bias_parser(), paths_parser(__file__), runtime_parser(),
                                         data_parser()])
    p.add_argument("--batch_size", type=positive_int, default=256, help="test batch size (default: %(default)s)")
    return p


def main(args):
    paths = ExperimentPaths.from_args(args, EXPERIMENT)
    out = paths.testing_results(args.model)
    save_run_args(args, out.parent, "test_args.json")
    used = verify(paths, args.model, split="test")  # the checkpoint was trained on this dataset (refused if not)
    acc = test_iem(args, paths, EXPERIMENT, ks=(1,))[1]
    write_csv_row(out, ["Accuracy"], [acc])  # full precision, as the authors
    write_output_record(out, used)  # the checkpoint and dataset tested (cortex.provenance)
    print(f"{args.bias_type} ClassificationNet{args.model}: accuracy {acc:.2f}%")
    print(f"wrote {out}")
    return acc


if __name__ == "__main__":
    run_main(main, get_args_parser)
