"""Seed replicates: one number per seed becomes mean [min, max] over the seeds, plus the concept tokens' stability.

Seed 0 writes the usual folders; seed s (``train.py/TIS_computation.py --seed s`` with
``--checkpoint_dir checkpoints/replicates/seed_<s>[/<bias_type>] --results_dir results/replicates/seed_<s>[/<bias_type>]``)
its own. This script reads them all (cortex/analysis/replicates.py; docs/evaluation.md#seed-replicates) and
writes results/replicates/replicates_summary.csv (quantity,mean,min,max,n,per_seed): the IEM's test
accuracy over the seeds and, per label, the mean pairwise Jaccard overlap of its top-k concept tokens
across the seeds.

    python summarize_replicates.py --seeds 0 1 2 --attribution smoothgrad_x_input
"""
from cortex.analysis.replicates import get_args_parser as _parser, main
from cortex.cli import run_main


def get_args_parser():
    return _parser(__file__, up=1, experiment="vqgan")


if __name__ == "__main__":
    run_main(main, get_args_parser)
