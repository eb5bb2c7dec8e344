"""Build the compact layout's datasets/codebook.npy from the authors' per-image .npy files.

    python compact_dataset.py [--n_codes 16384] [--vqgan_config model.yaml --vqgan_ckpt last.ckpt]

Reads every file of every split once and checks that each position holds the codebook vector of its CSV
id. Afterwards train.py / test.py / TIS_computation.py read codebook.npy + the CSVs (--data_layout auto)
and ship token ids instead of 256 KiB per image; the per-image files are left untouched.
"""
import argparse

from cortex.cli import compact_parser, make_parser, paths_parser, run_main
from cortex.data.dataset_tools import run_compact
from cortex.paths import ExperimentPaths

EXPERIMENT = "vqgan"


def get_args_parser():
    return make_parser("Per-image files -> compact layout (VQGAN)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[compact_parser(), paths_parser(__file__)])


def main(args):
    return run_compact(args, ExperimentPaths.from_args(args, EXPERIMENT).data_dir)


if __name__ == "__main__":
    run_main(main, get_args_parser)
