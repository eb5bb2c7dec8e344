"""TIS statistics of the train split (SPEC §1 step 4, §3): the concept tokens of each label.

    cd VQGAN_explanation
    python TIS_analysis.py --model 1                                   # the paper's SmoothGrad TIS
    python TIS_analysis.py --model 1 --attribution smoothgrad_x_input  # another attribution's TIS

Reads results/TIS[_<attribution>]/Net{m}/TIS_value_train/label_{k}.csv and the token ids
(datasets/train_token_indices.pkl, built from train_embeddings.csv when missing); writes
results/TIS[_<attribution>]/Net{m}/TIS_statistics_train/label_{k}.csv (sectioned: Top 1/5/10/20 Tokens),
global_top_tokens_statistics.csv and tis_statistics_long.csv (label,top_n,token,count).
"""
import argparse

from cortex.cli import paths_parser
from cortex.stats import analysis_parser, run_analysis

EXPERIMENT = "vqgan"


def get_args_parser():
    return argparse.ArgumentParser("TIS_analysis", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   parents=[analysis_parser((1, 2, 3, 4)), paths_parser()])


def main(args):
    return run_analysis(args, EXPERIMENT)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
