"""Train an Information Extraction Model (IEM) that predicts a bias attribute of "doctor" images.

    cd Dalle_explanation
    python train.py --model 1 --bias_type doctor_gender      # the paper's settings (10 epochs, batch 256, lr 1e-3)
    python train.py --model 3 --bias_type doctor_color --width 64 --depth 2 --epochs 3   # a quick CPU run
    python train.py --model 1 --bias_type doctor_gender --resume

Data: datasets/{bias_type}/embeddings/. Writes checkpoints/{bias_type}/ClassificationNet{m}/
{model.pth,best_model.pth,config.json,loss_curves.png,lightning/{last.ckpt,metrics.csv}} and
logs/training_log_<YYYYmmdd_HHMM>.txt (the experiment's logs/, as the authors'; a second run in the same minute
gets _2). A batch over a tenth of the training set is lowered (printed). Retraining a trained net needs --overwrite.
Adam (weight decay 1e-4), StepLR(5, 0.1), cross-entropy; the work is done by cortex.iem.training.train_iem.
"""
import argparse

from cortex.cli import bias_parser, data_parser, make_parser, model_parser, paths_parser, run_main, runtime_parser
from cortex.iem.registry import model_choices
from cortex.paths import ExperimentPaths
from cortex.iem.training import train_iem, train_parser

EXPERIMENT = "dalle"


def get_args_parser():
    return make_parser(
        "Train an IEM (DALL-E-mini bias)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[model_parser(model_choices("dalle")), bias_parser(), train_parser(EXPERIMENT), paths_parser(__file__), runtime_parser(),
                 data_parser()])


def main(args):
    return train_iem(args, ExperimentPaths.from_args(args, EXPERIMENT), EXPERIMENT)


if __name__ == "__main__":
    run_main(main, get_args_parser)
