"""Train an Information Extraction Model (IEM) that predicts a bias attribute of "doctor" images.

    cd Dalle_explanation
    python train.py --model 1 --bias_type doctor_gender      # the paper's settings (10 epochs, batch 256, lr 1e-3)
    python train.py --model 3 --bias_type doctor_color --width 64 --depth 2 --epochs 3   # a quick CPU run
    python train.py --model 1 --bias_type doctor_gender --resume

Data: datasets/{bias_type}/embeddings/. Writes checkpoints/{bias_type}/ClassificationNet{m}/
{model.pth,best_model.pth,config.json} and logs/{bias_type}/training_log_<YYYYmmdd_HHMM>.txt.
Adam (weight decay 1e-4), StepLR(5, 0.1), cross-entropy; the work is done by cortex.training.train_iem.
"""
import argparse

from cortex.cli import bias_parser, data_parser, model_parser, paths_parser, runtime_parser
from cortex.paths import ExperimentPaths
from cortex.training import train_iem, train_parser

EXPERIMENT = "dalle"


def get_args_parser():
    return argparse.ArgumentParser(
        "Train an IEM (DALL-E-mini bias)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[model_parser((1, 2, 3)), bias_parser(), train_parser(EXPERIMENT), paths_parser(), runtime_parser(),
                 data_parser()])


def main(args):
    return train_iem(args, ExperimentPaths.from_args(args, EXPERIMENT), EXPERIMENT)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
