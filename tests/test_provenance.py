"""Issue 21, provenance: one chain dataset -> IEM -> TIS -> statistics (-> significance), dataset -> frequency
baseline; every consumer verifies it up to the dataset and refuses a stale link with one error line naming it and
the command that rebuilds it (cortex/provenance.py)."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cortex.paths import ExperimentPaths
from cortex.utils import CortexError
from tests.conftest import TINY_WORLD
from tests.helpers import REPO, run_script
from tests.test_significance import dalle_root  # noqa: F401  (the fixture: a DALL-E run analysed)

pytestmark = pytest.mark.usefixtures("one_thread")
V = "VQGAN_explanation"
CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_root):
    """A finished pipeline on the tiny world: IEM, TIS (train and test), statistics, frequency baseline."""
    root = tmp_path_factory.mktemp("chain") / "exp"
    shutil.copytree(tiny_root / "datasets", root / "datasets")
    r = ["--root", root]
    run_script(f"{V}/train.py", ["--model", 1, "--width", 8, "--epochs", 1, "--batch_size", 8, *r, *CPU,
                                 "--accelerator", "cpu"])
    for split in ("train", "test"):
        run_script(f"{V}/TIS_computation.py", ["--model", 1, "--data_type", split, "--nsamples", 2, "--batch_size",
                                               25, *r, *CPU, "--no_progress"])
    run_script(f"{V}/TIS_analysis.py", ["--model", 1, *r, "--no_progress"])
    run_script(f"{V}/generate_freq_based_tokens.py", r)
    return root


@pytest.fixture()
def exp(chain, tmp_path):
    """A private copy of the finished pipeline (tests change it)."""
    root = tmp_path / "exp"
    shutil.copytree(chain, root, symlinks=True)
    return root


def _cli(script, args, cwd=REPO):
    """Run a script as a researcher does: a subprocess; returns (exit status, stdout, stderr)."""
    p = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def _one_error(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == lines[0], stderr  # one line: the message holds no line break
    return lines[0]


def test_every_artifact_records_what_it_was_computed_from(exp):
    from cortex.provenance import dataset_hashes, file_sha256, verify

    paths = ExperimentPaths(root=exp)
    cfg = json.loads((paths.model_dir(1) / "config.json").read_text())
    assert cfg["dataset"] == dataset_hashes(paths.data_dir)  # the IEM: the data it was trained on
    assert cfg["dataset"]["train_embeddings.csv"] == file_sha256(paths.data_dir / "train_embeddings.csv")
    tis = json.loads((paths.tis_dir(1, "train") / "tis_config.json").read_text())
    assert tis["checkpoint"]["sha256"] == file_sha256(paths.best_ckpt(1))  # the TIS run: its checkpoint
    src = json.loads((paths.stats_dir(1) / "source.json").read_text())
    assert src["tis_config"]["run_id"] == tis["run_id"] and len(src["statistics_id"]) == 16
    sig = json.loads((paths.stats_dir(1) / "tis_significance.csv.source.json").read_text())
    assert sig["statistics_id"] == src["statistics_id"]
    freq = json.loads((paths.frequency_dir() / "source.json").read_text())
    assert freq["dataset"] == {"train_embeddings.csv": file_sha256(paths.data_dir / "train_embeddings.csv")}
    used = verify(paths, 1, tis_split="test", statistics=True, frequency=True)
    assert used["statistics_id"] == src["statistics_id"] and used["tis_run_train"] == tis["run_id"]
    out = run_script(f"{V}/test.py", ["--model", 1, "--root", exp, *CPU]) and paths.testing_results(1)
    rec = json.loads((out.parent / "testing_results.csv.source.json").read_text())  # an output's record
    assert rec["inputs"]["checkpoint_sha256"] == file_sha256(paths.best_ckpt(1))
    assert rec["inputs"]["dataset"]["test_embeddings.csv"] == cfg["dataset"]["test_embeddings.csv"]


def test_regenerated_dataset_is_refused_by_every_consumer(exp, tmp_path):
    """generate_dataset.py --overwrite --seed 5 under an existing IEM, TIS and statistics."""
    r = ["--root", exp]
    code, _, err = _cli(f"{V}/generate_dataset.py", [*r, "--layout", "both", *TINY_WORLD, "--seed", 5])
    assert code == 2 and "--seed 0 -> 5" in _one_error(err) and "--overwrite" in err  # not replaced silently
    run_script(f"{V}/generate_dataset.py", [*r, "--layout", "both", *TINY_WORLD, "--seed", 5, "--overwrite"])
    paths = ExperimentPaths(root=exp)
    from cortex.provenance import check_frequency_baseline

    with pytest.raises(CortexError, match="stale frequency baseline.*another dataset.*generate_freq_based_tokens"):
        check_frequency_baseline(paths)  # the dataset's own child is stale too
    run_script(f"{V}/generate_freq_based_tokens.py", r)  # a new baseline: current, but the IEM below it is not
    assert check_frequency_baseline(paths)["labels"] == [0, 1, 2]
    retrain = "python train.py --model 1 --overwrite"
    m = ["--model", 1]
    cases = [
        (f"{V}/test.py", [*m, *r, *CPU]),
        (f"{V}/TIS_computation.py", [*m, "--data_type", "train", "--nsamples", 2, *r, *CPU,
                                     "--results_dir", tmp_path / "fresh_results"]),  # a fresh results folder too
        (f"{V}/TIS_analysis.py", [*m, *r]),
        (f"{V}/eval/sample_image_level_explanation.py", [*m, *r, "--evaluators", "synthetic"]),
        (f"{V}/eval/sample_concept_level_explanation.py", [*m, *r, "--evaluators", "synthetic", "--token_num", 4]),
        (f"{V}/eval/codebook_level_explanation.py", [*m, *r, "--evaluators", "synthetic", "--pairs", "0:1"]),
        (f"{V}/explanation_evaluation/concept_recovery.py", [*m, *r]),
        (f"{V}/explanation_evaluation/model_randomisation.py", [*m, *r, *CPU, "--num_images", 2]),
        (f"{V}/token_gallery.py", [*m, *r, *CPU, "--label", 0]),
    ]
    for script, args in cases:
        code, _, err = _cli(script, args)
        line = _one_error(err)
        assert code == 2 and "stale IEM checkpoint" in line and "trained on another dataset" in line, (script, err)
        assert retrain in line, (script, line)


def test_retrained_iem_makes_tis_and_statistics_stale(exp):
    """train.py --overwrite: TIS_analysis.py and the concept level refuse the previous IEM's TIS / statistics."""
    paths = ExperimentPaths(root=exp)
    r = ["--root", exp]
    run_script(f"{V}/train.py", ["--model", 1, "--width", 16, "--epochs", 1, "--batch_size", 8, *r, *CPU,
                                 "--accelerator", "cpu", "--overwrite"])
    for script, args in [(f"{V}/TIS_analysis.py", ["--model", 1, *r]),
                         (f"{V}/eval/sample_concept_level_explanation.py",
                          ["--model", 1, *r, "--evaluators", "synthetic", "--token_num", 4]),
                         (f"{V}/eval/sample_image_level_explanation.py", ["--model", 1, *r, "--evaluators", "synthetic"]),
                         (f"{V}/explanation_evaluation/concept_recovery.py", ["--model", 1, *r])]:
        code, _, err = _cli(script, args)
        line = _one_error(err)
        assert code == 2 and "stale TIS run" in line and "another IEM" in line, (script, err)
        assert "TIS_computation.py --model 1 --data_type" in line and "--overwrite" in line
    # the statistics themselves are current with their TIS run: the stale link named is the TIS run
    assert str(paths.tis_dir(1, "train")) in _one_error(_cli(f"{V}/TIS_analysis.py", ["--model", 1, *r])[2])


def test_dalle_tis_analysis_refuses_the_previous_iems_tis(dalle_root):
    root, paths = dalle_root  # a TIS run naming the checkpoint of then, analysed
    paths.best_ckpt(1).write_bytes(b"a retrained IEM")
    args = ["--root", root, "--model", 1, "--bias_type", "doctor_gender", "--no_progress"]
    code, _, err = _cli("Dalle_explanation/TIS_analysis.py", args)
    line = _one_error(err)
    assert code == 2 and "stale TIS run" in line and "--bias_type doctor_gender" in line


def test_generate_dataset_refuses_other_settings_without_overwrite(exp, tmp_path):
    r = ["--root", exp]
    before = (exp / "datasets" / "train_embeddings.csv").read_bytes()
    images = tmp_path / "pictures" / "0"
    images.mkdir(parents=True)
    for extra in (["--layout", "both", *TINY_WORLD, "--seed", 5],
                  ["--source", "images", "--image_dir", images.parent, "--vqgan_config", "x.yaml", "--vqgan_ckpt",
                   "x.ckpt"]):
        code, _, err = _cli(f"{V}/generate_dataset.py", [*r, *extra])
        assert code == 2 and "finished dataset made with other settings" in _one_error(err), err
    assert (exp / "datasets" / "train_embeddings.csv").read_bytes() == before
    # the same settings: nothing to do
    code, out, _ = _cli(f"{V}/generate_dataset.py", [*r, "--layout", "both", *TINY_WORLD])
    assert code == 0 and "nothing to do" in out


_KILL_DURING_RENAMES = r"""
import os, signal, sys, time, runpy
flag, script = sys.argv[1], sys.argv[2]
real, n = os.replace, [0]
def replace(src, dst, *a, **k):
    real(src, dst, *a, **k)
    if os.path.basename(str(dst)).startswith("label_") and "TIS_statistics" in str(dst):
        n[0] += 1
        if n[0] == 1:  # one new statistics file is in place, the others are the previous run's
            open(flag, "w").close()
            time.sleep(600)
os.replace = replace
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def test_tis_analysis_killed_leaves_no_statistics_a_consumer_accepts(exp, tmp_path):
    """kill -9 of TIS_analysis.py while it renames its files: a mix of old and new statistics is refused."""
    paths = ExperimentPaths(root=exp)
    stats = paths.stats_dir(1)
    old = {p.name: p.read_bytes() for p in stats.glob("label_*.csv")}
    flag = tmp_path / "mid_write"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_DURING_RENAMES, str(flag), str(REPO / V / "TIS_analysis.py"),
                             "--model", "1", "--root", str(exp), "--max_rows", "3", "--no_progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        if flag.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert flag.exists(), "TIS_analysis.py did not reach its renames"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    new = {p.name: p.read_bytes() for p in stats.glob("label_*.csv")}
    assert sum(new[k] != old[k] for k in old) == 1  # a real mix: one new file, the others old
    r = ["--root", exp]
    code, _, err = _cli(f"{V}/explanation_evaluation/concept_recovery.py", ["--model", 1, *r])
    line = _one_error(err)
    assert code == 2 and "did not finish" in line and "TIS_analysis.py" in line
    code, out, err = _cli(f"{V}/explanation_evaluation/concept_recovery.py", r)  # found on disk only: left out
    assert code == 2 and "no current TIS statistics" in _one_error(err) and "did not finish" in out
    code, _, err = _cli(f"{V}/eval/sample_concept_level_explanation.py",
                        ["--model", 1, *r, "--evaluators", "synthetic", "--token_num", 4])
    assert code == 2 and "did not finish" in _one_error(err)
    # the rerun repairs it
    run_script(f"{V}/TIS_analysis.py", ["--model", 1, "--root", exp, "--no_progress"])
    from cortex.analysis.significance import check_current_run

    check_current_run(paths, 1, "smoothgrad")


def test_significance_of_other_statistics_is_refused(exp):
    from cortex.analysis.significance import check_current_run

    paths = ExperimentPaths(root=exp)
    rec = paths.stats_dir(1) / "tis_significance.csv.source.json"
    rec.write_text(json.dumps({"statistics_id": "0123456789abcdef"}))  # a kill between the two outputs
    with pytest.raises(CortexError, match="stale significance file.*TIS_analysis.py --model 1"):
        check_current_run(paths, 1, "smoothgrad")


def test_failed_frequency_baseline_is_refused_not_dropped(exp, monkeypatch):
    """Disk full while the frequency baseline is written: concept_recovery.py and the concept level refuse it."""
    import errno

    from cortex.analysis import statistics as stats

    paths = ExperimentPaths(root=exp)
    real_open, calls = stats.StagedFiles.open, []

    def full_disk(self, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, path)

    monkeypatch.setattr(stats.StagedFiles, "open", full_disk)
    with pytest.raises(OSError):
        run_script(f"{V}/generate_freq_based_tokens.py", ["--root", exp])
    monkeypatch.undo()
    r = ["--root", exp]
    for script, args in [(f"{V}/explanation_evaluation/concept_recovery.py", r),
                         (f"{V}/eval/sample_concept_level_explanation.py",
                          ["--model", 1, *r, "--evaluators", "synthetic", "--token_num", 4])]:
        code, _, err = _cli(script, args)
        line = _one_error(err)
        assert code == 2 and "stale frequency baseline" in line and "did not finish" in line, err
        assert "generate_freq_based_tokens.py" in line
    run_script(f"{V}/generate_freq_based_tokens.py", ["--root", exp])  # the rerun repairs it
    rows = run_script(f"{V}/explanation_evaluation/concept_recovery.py", ["--root", exp])
    assert any(row["method"] == "frequency_baseline" for row in rows)
    assert json.loads((paths.results_dir / "Explanation" / "concept_recovery.csv.source.json").read_text())


def test_new_frequency_baseline_of_another_dataset_is_refused(exp):
    """The concept level after a new frequency baseline counted on another train CSV."""
    paths = ExperimentPaths(root=exp)
    csv_path = paths.data_dir / "train_embeddings.csv"
    rec = json.loads((paths.frequency_dir() / "source.json").read_text())
    rec["dataset"]["train_embeddings.csv"] = "0" * 64
    (paths.frequency_dir() / "source.json").write_text(json.dumps(rec))
    code, _, err = _cli(f"{V}/eval/sample_concept_level_explanation.py",
                        ["--model", 1, "--root", exp, "--evaluators", "synthetic", "--token_num", 4])
    assert code == 2 and "stale frequency baseline" in _one_error(err) and "another dataset" in err
    assert csv_path.exists()


def test_token_pickle_is_checked_by_content_not_time(tiny_root, tmp_path):
    from cortex.data.formats import load_token_indices, read_split

    d = tmp_path / "d"
    shutil.copytree(tiny_root / "datasets", d, ignore=shutil.ignore_patterns("images", "train", "val", "test"))
    pkl = d / "train_token_indices.pkl"
    first = read_split(d, "train")[0].filename
    truth = load_token_indices(d, "train")[first]
    with open(pkl, "rb") as f:
        cache = pickle.load(f)
    cache[first] = [63] * len(truth)  # edited: the pickle is now newer than its CSV
    with open(pkl, "wb") as f:
        pickle.dump(cache, f)
    assert pkl.stat().st_mtime_ns >= (d / "train_embeddings.csv").stat().st_mtime_ns
    assert load_token_indices(d, "train")[first] == truth  # rebuilt from the CSV
    with open(pkl, "rb") as f:
        assert pickle.load(f)[first] == truth
    (d / "train_token_indices.pkl.source.json").unlink()  # a pickle with no record (the authors' download)
    assert load_token_indices(d, "train")[first] == truth and (d / "train_token_indices.pkl.source.json").exists()


def test_codebook_disagreeing_with_the_files_is_detected(tiny_root, tmp_path):
    from cortex.data.formats import EmbeddingDataset

    d = tmp_path / "d"
    shutil.copytree(tiny_root / "datasets", d, ignore=shutil.ignore_patterns("images"))
    EmbeddingDataset(d, "train", layout="compact")  # the generator's codebook: agrees
    cb = np.load(d / "codebook.npy")
    np.save(d / "codebook.npy", cb[::-1].copy())  # another codebook of the same shape
    for layout in ("compact", "auto"):
        with pytest.raises(CortexError, match="codebook.npy disagrees with the per-image file.*compact_dataset.py"):
            EmbeddingDataset(d, "train", layout=layout)
    EmbeddingDataset(d, "train", layout="files")  # the files themselves are fine
