"""Seed replicates: one number per seed becomes mean [min, max] over the seeds, plus the concept tokens' stability.

Seed 0 writes the usual folders; seed s (``train.py/TIS_computation.py --seed s`` with
``--checkpoint_dir checkpoints/replicates/seed_<s>[/<bias_type>] --results_dir results/replicates/seed_<s>[/<bias_type>]``)
its own. This script reads them all (cortex/analysis/replicates.py; docs/evaluation.md#seed-replicates) and
writes results/{bias_type}/replicates/replicates_summary.csv (quantity,mean,min,max,n,per_seed): the IEM's test
accuracy over the seeds and, per label, the mean pairwise Jaccard overlap of its top-k concept tokens
across the seeds.
It also rewrites results/{bias_type}/Bias_detection/token_bias_top5_num10_cliff_robustness.csv: is each
label's direction the same on every seed and attribution?

    python summarize_replicates.py --seeds 0 1 2 --attribution smoothgrad_x_input
"""
from cortex.analysis.replicates import get_args_parser as _parser, main
from cortex.cli import run_main


def get_args_parser():
    return _parser(__file__, up=0, experiment="dalle")


if __name__ == "__main__":
    run_main(main, get_args_parser)
