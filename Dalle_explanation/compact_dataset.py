"""Build the compact layout's codebook.npy from the authors' per-image .npy files of one bias type.

    python compact_dataset.py --bias_type doctor_gender [--n_codes 16384]

Same as VQGAN_explanation/compact_dataset.py, for datasets/<bias_type>/embeddings.
"""
import argparse

from cortex.cli import bias_parser, compact_parser, make_parser, paths_parser, run_main
from cortex.data.dataset_tools import run_compact
from cortex.paths import ExperimentPaths

EXPERIMENT = "dalle"


def get_args_parser():
    return make_parser("Per-image files -> compact layout (DALL-E-mini)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[compact_parser(), bias_parser(), paths_parser(__file__)])


def main(args):
    return run_compact(args, ExperimentPaths.from_args(args, EXPERIMENT).data_dir)


if __name__ == "__main__":
    run_main(main, get_args_parser)
