"""Train an Information Extraction Model (IEM) on VQGAN token embeddings.

    python train.py --model 1                      # the paper's settings (80 epochs, batch 512)
    python train.py --model 4 --devices 4 --strategy ddp --precision bf16-mixed
    python train.py --model 1 --resume             # continue from checkpoints/ClassificationNet1/lightning/last.ckpt

Writes checkpoints/ClassificationNet{m}/{model.pth,best_model.pth,config.json,loss_curves.png} and
logs/training_log_<YYYYmmdd_HHMM>.txt; Lightning's lightning/last.ckpt (+ last.prev.ckpt) and metrics.csv.
Retraining a trained net needs --overwrite; --resume refuses changed settings (lr, batch size, ...).
"""
import argparse

from cortex.cli import data_parser, make_parser, model_parser, paths_parser, run_main, runtime_parser
from cortex.iem.registry import model_choices
from cortex.paths import ExperimentPaths
from cortex.iem.training import train_iem, train_parser

EXPERIMENT = "vqgan"


def get_args_parser():
    return make_parser(
        "Train an IEM (VQGAN)", parents=[model_parser(model_choices("vqgan")), train_parser(EXPERIMENT), paths_parser(__file__),
                                          runtime_parser(), data_parser()],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def main(args):
    return train_iem(args, ExperimentPaths.from_args(args, EXPERIMENT), EXPERIMENT)


if __name__ == "__main__":
    run_main(main, get_args_parser)
