"""Token Importance Scores of the training images of a bias IEM (SPEC §1 step 2, §5).

    cd Dalle_explanation
    python TIS_computation.py --model 1 --bias_type doctor_gender --batch_size 10
    python TIS_computation.py --model 1 --bias_type doctor_gender --resume          # after a kill

Writes results/{bias_type}/TIS/Net{m}/TIS_value_train/label_{k}.csv (header filename,label,contribution).
SmoothGrad of the target logit (20 draws, noise sd 0.2 (max - min) per image), channel max. The work is done
by cortex.attribution.tis.run_tis, shared with VQGAN_explanation (all of its flags apply: --attribution, --method, ...).
"""
import argparse

from cortex.attribution.tis import run_tis, tis_parser
from cortex.cli import bias_parser, data_parser, make_parser, model_parser, paths_parser, run_main, runtime_parser
from cortex.iem.registry import model_choices

EXPERIMENT = "dalle"


def get_args_parser():
    return make_parser(
        "TIS_computation (DALL-E-mini bias)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[paths_parser(__file__), runtime_parser(), data_parser(), model_parser(model_choices("dalle")), bias_parser(),
                 tis_parser(batch_size_default=10, data_type_default="train")])


def main(args):
    return run_tis(args, EXPERIMENT)


if __name__ == "__main__":
    run_main(main, get_args_parser)
