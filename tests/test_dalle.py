"""Dalle_explanation end to end on a tiny bias world: every script in-process, outputs and bad input."""
import csv
import json

import pytest

from cortex.utils import CortexError
from tests.helpers import run_script

D = "Dalle_explanation"
BT = "doctor_gender"
GEN = ["--train_per_class", 8, "--val_per_class", 2, "--test_per_class", 3, "--neutral_images", 24,
       "--n_codes", 160, "--attribute_tokens", 6, "--doctor_tokens", 8, "--n_background", 24,
       "--n_distractors", 8, "--layout", "compact", "--no_images", "--bias_ratio", 0.75]
TINY = ["--width", 16, "--depth", 2, "--epochs", 1, "--batch_size", 8, "--device", "cpu"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("dalle")
    run_script(f"{D}/generate_dataset.py", ["--root", r, "--bias_type", "all", *GEN])
    for m in (1, 2, 3):
        run_script(f"{D}/train.py", ["--root", r, "--model", m, "--bias_type", BT, *TINY])
    run_script(f"{D}/TIS_computation.py", ["--root", r, "--model", 1, "--bias_type", BT, "--nsamples", 2,
                                           "--device", "cpu", "--no_progress"])
    run_script(f"{D}/TIS_analysis.py", ["--root", r, "--model", 1, "--bias_type", BT, "--no_progress"])
    return r


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_tis_analysis_writes_the_significance_tests(root):
    """Both folders' TIS_analysis.py write tis_significance.csv (label-contrast) beside the authors' files."""
    stats = root / "results" / BT / "TIS" / "Net1" / "TIS_statistics_train"
    rows = _rows(stats / "tis_significance.csv")
    assert rows[0] == ["label", "top_n", "token", "images", "top_images", "expected", "ratio", "p_value", "q_value",
                       "occurrence_ratio", "p_occurrence", "p_attention"]
    assert {r[0] for r in rows[1:]} == {"0", "1"} and all(0 <= float(r[7]) <= float(r[8]) <= 1 for r in rows[1:])


def test_generate_dataset_layout_and_truth(root):
    ds = root / "datasets"
    for bt in ("doctor_gender", "doctor_color"):
        e = ds / bt / "embeddings"
        assert _rows(e / "train_embeddings.csv")[0] == ["filename", "label", "indices"]
        assert {r[1] for r in _rows(e / "test_embeddings.csv")[1:]} == {"0", "1"}
        assert json.loads((e / "dataset_info.json").read_text())["num_classes"] == 2
        gt = json.loads((e / "ground_truth.json").read_text())
        assert gt["bias_type"] == bt and gt["neutral_set"]["bias_ratio"] == 0.75
        assert gt["neutral_set"]["images_per_label"] == {"0": 18, "1": 6}
        assert gt["expected_direction"]["leans_to_label"] == 0
        assert not set(gt["concept_tokens"]["0"]) & set(gt["concept_tokens"]["1"])
    neutral = _rows(ds / "doctor_original" / "information" / "results_none.csv")
    assert neutral[0][:2] == ["filename", "indices"] and len(neutral) == 25
    # same flags: nothing to do; only a ratio changed: only the neutral set (and the truth) is rewritten
    before = (ds / BT / "embeddings" / "train_embeddings.csv").stat().st_mtime_ns
    run_script(f"{D}/generate_dataset.py", ["--root", root, "--bias_type", BT, *GEN, "--gender_ratio", 0.25])
    assert (ds / BT / "embeddings" / "train_embeddings.csv").stat().st_mtime_ns == before
    gt = json.loads((ds / BT / "embeddings" / "ground_truth.json").read_text())
    assert gt["neutral_set"]["bias_ratio"] == 0.25 and gt["expected_direction"]["leans_to_label"] == 1
    run_script(f"{D}/generate_dataset.py", ["--root", root, "--bias_type", "all", *GEN])  # back to 0.75
    with pytest.raises(CortexError, match="generation_args.json"):
        run_script(f"{D}/generate_dataset.py", ["--root", root, "--bias_type", BT, *GEN[:-2], "--seed", 3])
    with pytest.raises(CortexError, match="--source images"):
        run_script(f"{D}/generate_dataset.py", ["--root", root, "--bias_type", BT, "--source", "images"])


def test_all_three_nets_train_and_test(root):
    for m in (1, 2, 3):
        ck = root / "checkpoints" / BT / f"ClassificationNet{m}"
        assert (ck / "best_model.pth").exists() and (ck / "model.pth").exists()
        acc = run_script(f"{D}/test.py", ["--root", root, "--model", m, "--bias_type", BT, "--device", "cpu"])
        out = root / "results" / BT / "Classification" / f"ClassificationNet{m}" / "testing_results.csv"
        rows = _rows(out)
        assert rows[0] == ["Accuracy"] and float(rows[1][0]) == pytest.approx(acc, abs=0.01)
    assert len(list((root / "logs").glob("training_log_*.txt"))) >= 3  # logs/ as the authors (no {bias_type}/)


def test_tis_files(root):
    tis = root / "results" / BT / "TIS" / "Net1"
    for k in (0, 1):
        assert _rows(tis / "TIS_value_train" / f"label_{k}.csv")[0] == ["filename", "label", "contribution"]
        assert _rows(tis / "TIS_statistics_train" / f"label_{k}.csv")[0] == ["Total Images: 8"]


def test_bias_detection_outputs(root):
    out = run_script(f"{D}/bias_detection.py", ["--root", root, "--model", 1, "--bias_type", BT,
                                               "--top_n", 5, "--token_num", 4])
    path = root / "results" / BT / "Bias_detection" / "token_bias_top5_num4_cliff.csv"
    assert out["csv"] == path
    rows = _rows(path)
    assert rows[0] == ["total_files", "total_token_occurrences", "average_frequency_per_file",
                       "number_of_target_tokens", "label", "tokens", "cliff_delta", "cliff_delta_seed",
                       "p_value", "cliff_delta_ci_low", "cliff_delta_ci_high", "magnitude"]
    assert [r[4] for r in rows[1:]] == ["0", "1"]
    assert all(r[0] == "24" and r[3] == "4" for r in rows[1:])
    d0, d1 = float(rows[1][6]), float(rows[2][6])
    assert d0 == pytest.approx(-d1, abs=1e-6) and float(rows[1][7]) == pytest.approx(d0 / 2, abs=1e-6)
    assert out["figure"].exists() and out["figure"].suffix == ".png"


def test_bias_detection_bad_input(root, tmp_path):
    args = ["--root", root, "--model", 1, "--bias_type", BT, "--no_plot"]
    missing = tmp_path / "results_none.csv"
    with pytest.raises(CortexError, match=f"not found: {missing}"):
        run_script(f"{D}/bias_detection.py", [*args, "--neutral_csv", missing])
    bad = tmp_path / "no_indices.csv"
    bad.write_text('filename,ids\nnone_0.png,"[1, 2]"\n')
    with pytest.raises(CortexError, match=rf"{bad}: no 'indices' column"):
        run_script(f"{D}/bias_detection.py", [*args, "--neutral_csv", bad])
    stats = root / "results" / BT / "TIS" / "Net1" / "TIS_statistics_train" / "label_0.csv"
    with pytest.raises(CortexError, match=rf"{stats}: no 'Top 3 Tokens' section"):
        run_script(f"{D}/bias_detection.py", [*args, "--top_n", 3])
    with pytest.raises(CortexError, match="TIS_statistics_train"):
        run_script(f"{D}/bias_detection.py", ["--root", root, "--model", 2, "--bias_type", BT])


def test_generate_dataset_from_pictures(tmp_path):
    """--source images: labelled pictures and the neutral-prompt pictures through a tiny random taming VQGAN."""
    pytest.importorskip("taming")
    import numpy as np
    import torch
    from PIL import Image

    from cortex.analysis.bias import read_neutral_set
    from cortex.data.formats import read_split
    from cortex.data.taming_compat import import_taming
    from tests.test_taming import vq_params, write_yaml

    import_taming()
    from taming.main import instantiate_from_config

    torch.manual_seed(0)
    build = {"target": "taming.models.vqgan.VQModel",
             "params": {**vq_params(), "lossconfig": {"target": "torch.nn.Identity"}}}
    vq = instantiate_from_config(build)
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
    torch.save({"state_dict": vq.state_dict()}, tmp_path / "vq.ckpt")
    write_yaml(tmp_path / "vq.yaml", {"model": build})
    rng = np.random.default_rng(0)
    for folder, n in (("pics/0_male", 2), ("pics/1_female", 2), ("none", 3)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    root = tmp_path / "root"
    run_script(f"{D}/generate_dataset.py", [
        "--root", root, "--source", "images", "--bias_type", BT, "--image_dir", tmp_path / "pics",
        "--neutral_image_dir", tmp_path / "none", "--vqgan_config", tmp_path / "vq.yaml",
        "--vqgan_ckpt", tmp_path / "vq.ckpt", "--splits", "0.5,0,0.5", "--layout", "compact", "--no_images",
        "--device", "cpu"])
    data = root / "datasets" / BT / "embeddings"
    assert sorted(r.label for r in read_split(data, "train")) == [0, 1]
    assert json.loads((data / "dataset_info.json").read_text())["class_names"] == ["0_male", "1_female"]
    names, ids = read_neutral_set(root / "datasets" / "doctor_original" / "information" / "results_none.csv")
    assert names == ["0.png", "1.png", "2.png"] and all(i.shape == (256,) for i in ids)
