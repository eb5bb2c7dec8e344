"""Every path of SPEC §3 in one place.

``ExperimentPaths`` is built from a script's arguments; scripts never join output paths by hand,
so the VQGAN and DALL-E-mini folders (which differ only by a ``{bias_type}/`` level) share it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# The paper's attribution keeps the paper's folders; others get their own (results/TIS_<name>/...).
PAPER_ATTRIBUTION = "smoothgrad"
def attribution_suffix(attribution: str) -> str:
    """``""`` for the paper's attribution, else ``_<attribution>``: the one rule naming a non-paper attribution's
    folders (``results/TIS_<attribution>/``) and files (``..._<attribution>.csv``, ``..._<attribution>.png``)."""
    return "" if attribution == PAPER_ATTRIBUTION else f"_{attribution}"


SIGNIFICANCE_FILE = "tis_significance.csv"  # beside the statistics: the label-contrast test (the default)
ENRICHMENT_FILE = "tis_enrichment.csv"  # beside the statistics: the within-image test (TIS_analysis.py --enrichment)
LABEL_RE = re.compile(r"^label_(\d+)\.csv$")  # one file per label: TIS, statistics and frequency-baseline folders


def label_files(directory, pattern: str = "label_*.csv") -> dict[int, Path]:
    """``{label: path}`` of the ``label_{k}.csv`` files of a folder, sorted by label."""
    out = {}
    for p in Path(directory).glob(pattern):
        m = LABEL_RE.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def _absolute(path) -> Path:
    """``path`` made absolute against the current directory (``..`` folded), symlinks kept."""
    return Path(os.path.abspath(path))


@dataclass
class ExperimentPaths:
    """Paths of one experiment folder.

    experiment: ``"vqgan"`` or ``"dalle"``; bias_type: ``doctor_gender``/``doctor_color`` (dalle only).
    """

    experiment: str = "vqgan"
    root: Path = Path(".")
    bias_type: str | None = None
    data_dir: Path | None = None
    checkpoint_dir: Path | None = None
    results_dir: Path | None = None
    log_dir: Path | None = None

    def __post_init__(self):
        self.root = _absolute(self.root)  # messages name absolute paths; a relative --root is relative to the cwd
        sub = Path(self.bias_type) if self.experiment == "dalle" and self.bias_type else Path()
        if self.data_dir is None:
            self.data_dir = self.root / "datasets" / sub / ("embeddings" if self.experiment == "dalle" else "")
        if self.checkpoint_dir is None:
            self.checkpoint_dir = self.root / "checkpoints" / sub
        if self.results_dir is None:
            self.results_dir = self.root / "results" / sub
        if self.log_dir is None:
            # the experiment's one logs/ folder, as the authors' (no {bias_type}/ level): two runs started in the
            # same minute get training_log_<minute>.txt and training_log_<minute>_2.txt (training.claim_new_file)
            self.log_dir = self.root / "logs"
        self.data_dir, self.checkpoint_dir = _absolute(self.data_dir), _absolute(self.checkpoint_dir)
        self.results_dir, self.log_dir = _absolute(self.results_dir), _absolute(self.log_dir)

    @classmethod
    def from_args(cls, args, experiment: str) -> "ExperimentPaths":
        return cls(
            experiment=experiment,
            root=getattr(args, "root", "."),
            bias_type=getattr(args, "bias_type", None),
            data_dir=getattr(args, "data_dir", None),
            checkpoint_dir=getattr(args, "checkpoint_dir", None),
            results_dir=getattr(args, "results_dir", None),
            log_dir=getattr(args, "log_dir", None),
        )

    # --- IEM checkpoints and test results
    def model_dir(self, m: int) -> Path:
        return self.checkpoint_dir / f"ClassificationNet{m}"

    def best_ckpt(self, m: int) -> Path:
        return self.model_dir(m) / "best_model.pth"

    def last_ckpt(self, m: int) -> Path:
        return self.model_dir(m) / "model.pth"

    def loss_curves(self, m: int) -> Path:
        """Training curves of ClassificationNet{m} (train loss, val loss, val accuracy per epoch), beside its
        ``model.pth``; redrawn from the training log after every epoch."""
        return self.model_dir(m) / "loss_curves.png"

    def metrics_csv(self, m: int) -> Path:
        """Lightning's CSVLogger file of ClassificationNet{m} (columns epoch, step, train_loss, val_loss,
        val_acc), beside Lightning's ``last.ckpt``."""
        return self.model_dir(m) / "lightning" / "metrics.csv"

    def testing_results(self, m: int) -> Path:
        return self.results_dir / "Classification" / f"ClassificationNet{m}" / "testing_results.csv"

    # --- TIS
    def tis_root(self, attribution: str = PAPER_ATTRIBUTION) -> Path:
        return self.results_dir / f"TIS{attribution_suffix(attribution)}"

    def tis_dir(self, m: int, split: str, attribution: str = PAPER_ATTRIBUTION) -> Path:
        return self.tis_root(attribution) / f"Net{m}" / f"TIS_value_{split}"

    def tis_file(self, m: int, split: str, label: int, attribution: str = PAPER_ATTRIBUTION) -> Path:
        return self.tis_dir(m, split, attribution) / f"label_{label}.csv"

    def tis_models(self, attribution: str = PAPER_ATTRIBUTION) -> list[int]:
        """The ``m`` of every ``Net{m}`` folder under :meth:`tis_root` (sorted; none when it does not exist)."""
        root = self.tis_root(attribution)
        found = root.glob("Net*") if root.is_dir() else ()
        return sorted(int(d.name[3:]) for d in found if d.name[3:].isdigit() and d.name == f"Net{int(d.name[3:])}")

    def stats_dir(self, m: int, attribution: str = PAPER_ATTRIBUTION) -> Path:
        return self.tis_root(attribution) / f"Net{m}" / "TIS_statistics_train"

    def stats_file(self, m: int, label: int, attribution: str = PAPER_ATTRIBUTION) -> Path:
        return self.stats_dir(m, attribution) / f"label_{label}.csv"

    def frequency_dir(self) -> Path:
        return self.results_dir / "TIS" / "frequency_baseline"

    def frequency_file(self, label: int) -> Path:
        return self.frequency_dir() / f"label_{label}.csv"

    # --- evaluation (VQGAN) and bias detection (DALL-E-mini)
    def explanation_dir(self, m: int) -> Path:
        return self.results_dir / "Explanation" / f"model_{m}"

    def figures_dir(self, m: int) -> Path:
        return self.explanation_dir(m) / "figures"

    def token_gallery_file(self, m: int, label: int, top_n: int, attribution: str = PAPER_ATTRIBUTION) -> Path:
        """The token gallery of a label's concept tokens (VQGAN_explanation/token_gallery.py)."""
        return self.figures_dir(m) / f"token_gallery_label{label}_top{top_n}{attribution_suffix(attribution)}.png"

    def bias_dir(self) -> Path:
        return self.results_dir / "Bias_detection"

    # --- DALL-E-mini neutral-prompt set
    def neutral_csv(self) -> Path:
        return self.root / "datasets" / "doctor_original" / "information" / "results_none.csv"
