"""The command line: parse-time validation, no abbreviations, file permissions, error messages instead of
tracebacks, scripts that find their experiment folder, quiet runs (issues 12 and 14)."""
import argparse
import errno
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest

from cortex.cli import int_in, position_int, run_main
from cortex.paths import ExperimentPaths
from cortex.utils import (CortexError, atomic_save_npy, atomic_write, generator_command, get_device, save_run_args)
from tests.helpers import REPO, load_script

PY = sys.executable
SCRIPTS = sorted(str(p.relative_to(REPO)) for folder in ("VQGAN_explanation", "Dalle_explanation")
                 for p in (REPO / folder).rglob("*.py")
                 if "def get_args_parser" in p.read_text())
# numeric flags that stay plain int: IEM ids are restricted by ``choices``
PLAIN_INT_OK = {"--model"}


def _parser(script):
    return load_script(script).get_args_parser()


def _parse_error(capsys, script, argv):
    """argparse's exit status and its error line for ``argv``."""
    with pytest.raises(SystemExit) as e:
        _parser(script).parse_args([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- 12.8: flags validated at parse time

@pytest.mark.parametrize("script, argv, message", [
    ("VQGAN_explanation/train.py", ["--model", 1, "--width", 0], "argument --width: must be an integer >= 1, got '0'"),
    ("VQGAN_explanation/train.py", ["--model", 1, "--batch_size", 0], "argument --batch_size: must be an integer >= 1"),
    ("VQGAN_explanation/train.py", ["--model", 1, "--epochs", 0], "argument --epochs: must be an integer >= 1"),
    ("VQGAN_explanation/train.py", ["--model", 1, "--num_classes", 0], "argument --num_classes: must be an integer >= 2"),
    ("VQGAN_explanation/train.py", ["--model", 1, "--lr", -0.1], "argument --lr: must be a number > 0, got '-0.1'"),
    ("VQGAN_explanation/train.py", ["--model", 1, "--lr", "nan"], "argument --lr: must be a number > 0"),
    ("VQGAN_explanation/train.py", ["--model", 1, "--num_workers", -1], "argument --num_workers: must be an integer >= 0"),
    ("VQGAN_explanation/generate_dataset.py", ["--train_per_class", 0], "argument --train_per_class: must be an integer >= 1"),
    ("VQGAN_explanation/TIS_analysis.py", ["--model", 1, "--top_ns", 1, 0], "argument --top_ns: must be an integer in 1..256, got '0'"),
    ("VQGAN_explanation/TIS_analysis.py", ["--model", 1, "--top_ns", 257], "argument --top_ns: must be an integer in 1..256"),
    ("VQGAN_explanation/TIS_computation.py", ["--model", 1, "--data_type", "train", "--nsamples", 0], "argument --nsamples: must be an integer >= 1"),
    ("VQGAN_explanation/TIS_computation.py", ["--model", 1, "--data_type", "train", "--stdev_spread", -1], "argument --stdev_spread: must be a number >= 0"),
    ("VQGAN_explanation/TIS_computation.py", ["--model", 1, "--data_type", "train", "--shard", -1], "argument --shard: must be an integer >= 0"),
    ("Dalle_explanation/bias_detection.py", ["--token_num", 0], "argument --token_num: must be an integer >= 1"),
    ("Dalle_explanation/bias_detection.py", ["--top_n", 300], "argument --top_n: must be an integer in 1..256, got '300'"),
    ("Dalle_explanation/generate_dataset.py", ["--bias_ratio", 1.5], "argument --bias_ratio: must be a number >= 0 and <= 1"),
    ("VQGAN_explanation/eval/sample_concept_level_explanation.py", ["--model", 1, "--top_n", 0], "argument --top_n: must be an integer in 1..256"),
    ("VQGAN_explanation/eval/codebook_level_explanation.py", ["--model", 1, "--rows", -1, 3], "argument --rows: must be an integer >= 0"),
])
def test_bad_flag_is_a_parse_error(capsys, script, argv, message):
    code, line = _parse_error(capsys, script, argv)
    assert code == 2 and "error: " + message in line, line


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_is_validated(script):
    """The sweep: no script has a numeric flag of plain ``type=int``/``float`` left (besides ``choices`` ones)."""
    plain = [a.option_strings[0] for a in _parser(script)._actions
             if a.type in (int, float) and a.choices is None and a.option_strings[0] not in PLAIN_INT_OK]
    assert plain == [], f"{script}: {plain} accept any number; give them a cortex.cli type"


def test_validated_types_accept_the_valid_range():
    args = _parser("VQGAN_explanation/TIS_analysis.py").parse_args(["--model", "1", "--top_ns", "1", "256"])
    assert args.top_ns == [1, 256]
    assert position_int("5") == 5 and int_in(-1, 1)("-1") == -1
    with pytest.raises(argparse.ArgumentTypeError, match="must be an integer in 1..256, got 'x'"):
        position_int("x")


# ----------------------------------------------------------------------------- 12.10: no abbreviations

@pytest.mark.parametrize("script", SCRIPTS)
def test_no_prefix_matching(script):
    assert _parser(script).allow_abbrev is False


def test_epoch_is_not_epochs(capsys):
    code, line = _parse_error(capsys, "VQGAN_explanation/train.py", ["--model", 1, "--epoch", 3])
    assert code == 2 and "unrecognized arguments: --epoch 3" in line


# ----------------------------------------------------------------------------- file permissions follow the umask

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_honours_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "a.csv") as f:
            f.write("x\n")
        atomic_save_npy(tmp_path / "b.npy", np.zeros(3))
    finally:
        os.umask(old)
    for name in ("a.csv", "b.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert (tmp_path / "a.csv").read_text() == "x\n"


# ----------------------------------------------------------------------------- errors: a message, exit status 2

FREQ = REPO / "VQGAN_explanation" / "generate_freq_based_tokens.py"  # the cheapest script to start


def _run(argv, cwd, **env):
    return subprocess.run([PY, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "CORTEX_DEBUG": "", **env}, timeout=300)


def test_cortex_error_is_a_message_not_a_traceback(tmp_path):
    """Run from another folder with a relative --root: relative to the cwd, named absolutely in the message."""
    r = _run([FREQ, "--root", "rel"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: dataset folder not found: {tmp_path}/rel/datasets. "), r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _run([FREQ, "--root", "rel"], cwd=tmp_path, CORTEX_DEBUG="1")
    assert r.returncode == 1 and "Traceback" in r.stderr and "CortexError: dataset folder not found" in r.stderr


def test_debug_flag_raises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mod = load_script(FREQ)
    with pytest.raises(CortexError, match="dataset folder not found"):
        run_main(mod.main, mod.get_args_parser, ["--root", "rel", "--debug"])
    with pytest.raises(SystemExit) as e:
        run_main(mod.main, mod.get_args_parser, ["--root", "rel"])
    assert e.value.code == 2


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only file system"),
                                          (errno.EACCES, "permission denied")])
def test_write_errors_name_the_folder(tmp_path, capsys, code, reason):
    out = tmp_path / "results"
    out.mkdir()

    def main(args):
        raise OSError(code, os.strerror(code), str(out / "label_0.csv"))

    with pytest.raises(SystemExit) as e:
        run_main(main, lambda: argparse.ArgumentParser(), [])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith(f"error: cannot write {out}: {reason} — "), err
    assert "--results_dir" in err and "Traceback" not in err


def test_disk_full_during_write_is_a_message(capsys):
    """A real ENOSPC (/dev/full) from a write() that names no file."""
    def main(args):
        with open("/dev/full", "w") as f:
            f.write("x" * 10)

    with pytest.raises(SystemExit) as e:
        run_main(main, lambda: argparse.ArgumentParser(), [])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: cannot write the output folder: disk full")


def test_other_os_errors_keep_their_traceback():
    def main(args):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere/x")

    with pytest.raises(FileNotFoundError):
        run_main(main, lambda: argparse.ArgumentParser(), [])


def test_run_script_keeps_raising(tmp_path):
    from tests.helpers import run_script

    with pytest.raises(CortexError, match=f"dataset folder not found: {tmp_path}/none"):
        run_script(FREQ, ["--root", tmp_path / "none"])


# ----------------------------------------------------------------------------- 14.2: scripts find their folder

@pytest.mark.parametrize("script", SCRIPTS)
def test_root_defaults_to_the_experiment_folder(script):
    path = REPO / script
    folder = path.parent if path.parent.name.endswith("_explanation") else path.parent.parent
    assert _parser(script).get_default("root") == str(folder)


def test_help_from_anywhere_names_the_absolute_root(tmp_path):
    # a wide terminal: argparse would otherwise break a long (or hyphenated) path across lines
    r = _run([REPO / "VQGAN_explanation/eval/sample_concept_level_explanation.py", "--help"], cwd=tmp_path,
             COLUMNS="400")
    assert r.returncode == 0
    assert re.search(rf"\(default:\s+{re.escape(str(REPO / 'VQGAN_explanation'))}\)", r.stdout), r.stdout


def test_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = ExperimentPaths("dalle", root="exp", bias_type="doctor_gender", results_dir="../out")
    assert p.data_dir == tmp_path / "exp/datasets/doctor_gender/embeddings"
    assert p.results_dir == tmp_path.parent / "out"
    assert generator_command(REPO / "VQGAN_explanation/datasets") == \
        f"python {REPO / 'VQGAN_explanation/generate_dataset.py'}"
    assert generator_command(REPO / "Dalle_explanation/datasets/doctor_gender/embeddings") == \
        f"python {REPO / 'Dalle_explanation/generate_dataset.py'}"


# ----------------------------------------------------------------------------- 14.3: quiet by default

NOISE = ("litlogger", "LeafSpec", "TPU available", "GPU available", "HPU available", "Total params", "💡")


def _non_progress(text: str) -> list[str]:
    lines = re.split(r"[\r\n]+", text)
    return [ln for ln in lines if ln.strip() and "it/s]" not in ln and "s/it]" not in ln and not ln.endswith("\x1b[A")]


def test_tiny_training_is_quiet_and_falls_back_to_cpu(tiny_root, tmp_path):
    """The shell path: one settings line, the paper's epoch lines, no third-party noise; --gpu 0 without CUDA:
    one warning line, the CPU. Outputs are 0664 under umask 002."""
    import torch

    argv = [REPO / "VQGAN_explanation/train.py", "--model", 1, "--width", 8, "--epochs", 1, "--batch_size", 16,
            "--data_dir", tiny_root / "datasets", "--checkpoint_dir", tmp_path / "ck", "--log_dir", tmp_path / "logs",
            "--gpu", 0]
    r = subprocess.run([PY, *map(str, argv)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       preexec_fn=lambda: os.umask(0o002))
    assert r.returncode == 0, r.stderr[-3000:]
    everything = r.stdout + r.stderr
    for word in NOISE:
        assert word not in everything, word
    lines = _non_progress(r.stdout)
    assert lines[0].startswith("train.py: model=1 width=8 epochs=1 batch_size=16 ")
    assert lines[0].endswith(f"-> {tmp_path / 'ck' / 'ClassificationNet1'}")
    assert len(lines) <= 1 + 3, lines  # settings + the 2 epoch lines + "best ... saved"
    if not torch.cuda.is_available():
        warnings = [ln for ln in _non_progress(r.stderr) if ln.startswith("warning:")]
        assert warnings == ["warning: --gpu 0: CUDA is not available on this machine; running on the CPU"]
    written = [f for d in ("ck", "logs") for f in (tmp_path / d).rglob("*") if f.is_file()]
    assert any(f.name == "best_model.pth" for f in written) and any(f.suffix == ".txt" for f in written), written
    for f in written:  # checkpoints, config.json, train_args.json, Lightning's last.ckpt, the training log
        assert stat.S_IMODE(f.stat().st_mode) == 0o664, f


def test_settings_line_and_verbose(tmp_path, capsys):
    args = argparse.Namespace(model=1, width=8, top_ns=[1, 5], root="x", data_dir=None, verbose=False, debug=False,
                              resume=False, overwrite=True)
    save_run_args(args, tmp_path, "a.json")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].endswith(f": model=1 width=8 top_ns=1,5 overwrite -> {tmp_path}")
    args.verbose = True
    save_run_args(args, tmp_path, "b.json")
    out = capsys.readouterr().out.splitlines()
    assert "width: 8" in out and "root: x" in out and len(out) == len(vars(args))


def test_cuda_request_without_cuda_warns(capsys):
    import torch

    if torch.cuda.is_available():
        assert get_device("cuda").type == "cuda"
        return
    assert get_device("cuda:1").type == "cpu" and get_device(None, 0).type == "cpu"
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: --device cuda:1: CUDA is not available on this machine; running on the CPU",
                   "warning: --gpu 0: CUDA is not available on this machine; running on the CPU"]
    with pytest.raises(CortexError, match="--device gpu0: not a torch device"):
        get_device("gpu0")


def test_message_flags_do_not_change_a_dataset(tmp_path, capsys):
    """--verbose/--debug are not generation arguments: a finished dataset is not rebuilt for them."""
    from tests.conftest import TINY_WORLD
    from tests.helpers import run_script

    run_script("VQGAN_explanation/generate_dataset.py", ["--root", tmp_path, *TINY_WORLD])
    first = capsys.readouterr().out
    assert first.startswith("generate_dataset.py: ") and f"-> {tmp_path / 'datasets'}" in first.splitlines()[0]
    run_script("VQGAN_explanation/generate_dataset.py", ["--root", tmp_path, *TINY_WORLD, "--verbose", "--debug"])
    assert "is complete for these arguments; nothing to do" in capsys.readouterr().out
