"""Token Importance Scores of every image of a split (SPEC §1 step 2, §5).

    cd VQGAN_explanation
    python TIS_computation.py --model 1 --data_type train --batch_size 25 --gpu 0
    python TIS_computation.py --model 1 --data_type train --attribution smoothgrad_x_input
    python TIS_computation.py --model 1 --data_type train --resume            # after a kill
    python TIS_computation.py --model 1 --data_type train --noise_scope authors --batch_size 4  # the authors' exact draws
    python TIS_computation.py --model 3 --data_type train --fast --max_memory_gb 12
    sbatch --array=0-7 ... python TIS_computation.py --model 1 --data_type train   # 8 label shards

Writes results/TIS/Net{m}/TIS_value_{split}/label_{k}.csv (header filename,label,contribution);
other attributions under results/TIS_<attribution>/. The work is done by cortex.attribution.tis.run_tis.
"""
import argparse

from cortex.attribution.tis import run_tis, tis_parser
from cortex.cli import data_parser, make_parser, model_parser, paths_parser, run_main, runtime_parser
from cortex.iem.registry import model_choices


def get_args_parser():
    return make_parser(
        "TIS_computation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[paths_parser(__file__), runtime_parser(), data_parser(), model_parser(model_choices("vqgan")), tis_parser(batch_size_default=25)])


def main(args):
    return run_tis(args, "vqgan")


if __name__ == "__main__":
    run_main(main, get_args_parser)
