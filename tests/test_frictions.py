"""The small frictions of issue 22 (item 5), each with its test: a mistyped flag gets one line and a suggestion,
``--accelerator gpu`` without CUDA is an error, no top-k above the number of classes, ``--quiet`` for every
script, one near-chance warning, the notebook's text matches what it shows, ``--resolution``'s help."""
import argparse
import json
import re
import subprocess
import sys
import warnings

import pytest

from cortex.cli import quiet_third_party, set_progress_bars
from cortex.utils import CortexError
from tests.helpers import REPO, load_script

SCRIPTS = sorted(str(p.relative_to(REPO)) for folder in ("VQGAN_explanation", "Dalle_explanation")
                 for p in (REPO / folder).rglob("*.py") if "def get_args_parser" in p.read_text())


def test_mistyped_flag_is_one_line_with_a_suggestion(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "VQGAN_explanation" / "train.py"), "--model", "1", "--epoch", "3",
                        "--widht", "8"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "unrecognized arguments: --epoch 3 --widht 8" in lines[0]
    assert "--epoch: did you mean --epochs?" in lines[0] and "--widht: did you mean --width?" in lines[0]
    assert "-h lists every flag" in lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_quiet_and_one_line_errors(script, capsys):
    parser = load_script(script).get_args_parser()
    assert "--quiet" in parser._option_string_actions, f"{script}: no --quiet"
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--no_such_flag_at_all"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error: " in err[0] and err[0].endswith("-h lists every flag"), err  # no usage dump


def test_quiet_switches_every_tqdm_bar_off_and_back():
    import io

    from tqdm import tqdm

    def drawn(**kw):
        f = io.StringIO()
        for _ in tqdm(range(3), file=f, **kw):
            pass
        return f.getvalue()

    assert "3/3" in drawn(disable=False)
    set_progress_bars(False)
    try:
        assert drawn(disable=False) == ""  # whatever the call site says
    finally:
        set_progress_bars(True)
    assert "3/3" in drawn()


def test_quiet_training_writes_no_progress_bars(tiny_root, tmp_path):
    argv = [REPO / "VQGAN_explanation/train.py", "--model", 1, "--width", 8, "--epochs", 1, "--batch_size", 16,
            "--data_dir", tiny_root / "datasets", "--checkpoint_dir", tmp_path / "ck", "--log_dir", tmp_path / "logs",
            "--device", "cpu", "--accelerator", "cpu", "--quiet"]
    r = subprocess.run([sys.executable, *map(str, argv)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    both = r.stdout + r.stderr
    assert "it/s" not in both and "s/it" not in both and "\r" not in both, both[-2000:]
    assert (tmp_path / "ck" / "ClassificationNet1" / "best_model.pth").is_file()
    assert len(both) < 2000  # a few result lines, not kilobytes of bars


def test_accelerator_gpu_without_cuda_is_an_error():
    import torch

    from cortex.iem.training import _accelerator_and_devices

    args = argparse.Namespace(accelerator="gpu", devices="auto", device=None, gpu=None)
    if torch.cuda.is_available():
        assert _accelerator_and_devices(args)[0] == "gpu"
        return
    with pytest.raises(CortexError, match="--accelerator gpu: CUDA is not available"):
        _accelerator_and_devices(args)
    # the seed's --gpu keeps its warning-and-CPU behaviour; auto picks the CPU silently
    assert _accelerator_and_devices(argparse.Namespace(accelerator="auto", devices="auto", device=None, gpu=0))[0] == "cpu"
    assert _accelerator_and_devices(argparse.Namespace(accelerator="auto", devices="auto", device=None, gpu=None))[0] \
        in ("auto", "cpu")


def test_topk_not_shown_above_the_number_of_classes():
    from cortex.iem.testing import topk_line

    line = topk_line({1: 83.333, 3: 100.0, 5: 100.0, 10: 100.0, "num_classes": 3}, (1, 3, 5, 10))
    assert line == "Top-1: 83.33%, Top-3: 100.00%, Top-5: n/a (3 classes), Top-10: n/a (3 classes)"
    assert "n/a" not in topk_line({1: 50.0, 3: 70.0, 5: 80.0, 10: 90.0, "num_classes": 12}, (1, 3, 5, 10))


def test_near_chance_is_one_banner_not_two(tmp_path, capsys):
    from cortex.attribution import tis as T

    ckpt = tmp_path / "ClassificationNet1" / "best_model.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    (ckpt.parent / "config.json").write_text(json.dumps({"val_acc": 52.0}))
    res = tmp_path / "testing_results.csv"
    res.write_text("Accuracy\n51.0\n")
    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()  # Python's own filters, as in a shell run
        quiet_third_party()  # what run_main / run_script do: the warnings module does not repeat the banner
        assert len(T.check_iem_not_near_chance(ckpt, res, 2)) == 2
    err = capsys.readouterr().err
    assert err.count("WARNING:") == 1 and "51.00%" in err and "52.00%" in err
    assert shown == []
    with pytest.warns(UserWarning, match="near chance"):  # a catcher still gets it, after quiet_third_party too
        quiet_third_party()
        T.check_iem_not_near_chance(ckpt, res, 2)


def test_notebook_text_matches_what_it_shows():
    nb = json.loads((REPO / "notebooks" / "quickstart.ipynb").read_text())
    for c in nb["cells"]:
        text = "".join(c["source"])
        if c["cell_type"] == "markdown":  # no accuracy promised in prose: the cells print what they measure
            assert not re.search(r"\d+\s?%", text), text
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert 'dataset_info.json").read_text())["num_classes"]' in code and "1 / n_labels" in code
    assert "1 / len(truth)" not in code  # the planted labels only: 10% for the demo's 12 labels


def test_resolution_help_allows_any_grid():
    text = load_script("VQGAN_explanation/generate_dataset.py").get_args_parser().format_help()
    flat = " ".join(text.split())
    assert "16x16 token grid" not in flat and "Any size works" in flat
