"""Merge dataset folders generated separately into one --data_dir.

    python merge_datasets.py --inputs datasets_0-499 datasets_500-999          # -> datasets/

For real VQGAN data sampled on several GPUs, each job writes its own folder (generate_dataset.py
--source cin_transformer --classes 0-499 --data_dir datasets_0-499, ...). The folders must share the
VQGAN (equal codebook.npy) and hold different images. Per-image .npy files and PNGs are hard-linked
(--copy to copy), the CSVs concatenated and sorted, the token-index pickles rebuilt and
dataset_info.json merged (its merged_from lists each input's own settings).
"""
import argparse

from cortex.cli import make_parser, merge_parser, paths_parser, run_main
from cortex.data.dataset_tools import run_merge
from cortex.paths import ExperimentPaths

EXPERIMENT = "vqgan"


def get_args_parser():
    return make_parser("Merge dataset folders (VQGAN)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[merge_parser(), paths_parser(__file__)])


def main(args):
    return run_merge(args, ExperimentPaths.from_args(args, EXPERIMENT).data_dir)


if __name__ == "__main__":
    run_main(main, get_args_parser)
