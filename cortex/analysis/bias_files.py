"""The bias-detection table (``results/[{bias_type}/]Bias_detection/token_bias_top{n}_num{k}[_exclude_shared].csv``).

The authors' columns in their order and format (``tokens`` as ``['12', '7']``, the average as a Python float),
rows in ascending label order, then the extra columns ``cliff_delta_seed, p_value, cliff_delta_ci_low,
cliff_delta_ci_high, magnitude``.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..paths import PAPER_ATTRIBUTION, attribution_suffix
from ..utils import CortexError, atomic_write, parse_int_list
from .cliffs_delta import magnitude

BIAS_HEADER = ["total_files", "total_token_occurrences", "average_frequency_per_file", "number_of_target_tokens",
               "label", "tokens", "cliff_delta", "cliff_delta_seed", "p_value", "cliff_delta_ci_low",
               "cliff_delta_ci_high", "magnitude"]


@dataclass
class BiasRow:
    label: int
    tokens: list
    counts: np.ndarray  # (N,) per-image occurrences of the label's tokens
    cliff_delta: float
    cliff_delta_seed: float
    p_value: float = float("nan")  # two-sided Mann-Whitney U
    ci: tuple = (float("nan"), float("nan"))  # seeded percentile-bootstrap 95% CI of cliff_delta

    def csv_row(self) -> list:
        """The authors' columns in their format (``tokens`` as pandas writes a list of str: ``['12', '7']``;
        the average as a Python float), then this project's extra columns."""
        n = int(self.counts.size)
        total = int(self.counts.sum())
        return [n, total, repr(total / n), len(self.tokens), self.label, authors_tokens_cell(self.tokens),
                f"{self.cliff_delta:.6f}", f"{self.cliff_delta_seed:.6f}", f"{self.p_value:.6g}",
                f"{self.ci[0]:.6f}", f"{self.ci[1]:.6f}", magnitude(self.cliff_delta)]


def authors_tokens_cell(tokens) -> str:
    """The ``tokens`` cell as the authors' script writes it: the repr of a list of token-id strings."""
    return str([str(int(t)) for t in tokens])


def parse_tokens_cell(text: str, where: str = "") -> list[int]:
    """Token ids of a ``tokens`` cell: the authors' ``['12', '7']`` or a plain ``[12, 7]``."""
    return parse_int_list(text.replace("'", "").replace('"', ""), where=where).tolist()


def write_bias_csv(path, rows: list[BiasRow]) -> Path:
    with atomic_write(path) as f:
        w = csv.writer(f)
        w.writerow(BIAS_HEADER)
        for r in rows:
            w.writerow(r.csv_row())
    return Path(path)


def read_bias_csv(path) -> list[dict]:
    """Rows of a ``token_bias_top{n}_num{k}_cliff.csv`` (label, tokens, cliff_delta, ... as Python values)."""
    path = Path(path)
    if not path.exists():
        raise CortexError(f"bias detection result not found: {path}; run bias_detection.py first")
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"label", "tokens", "cliff_delta"} - set(reader.fieldnames or [])
        if missing:
            raise CortexError(f"{path}: missing columns {sorted(missing)}")
        for row in reader:
            d = dict(row)
            d["label"] = int(row["label"])
            d["tokens"] = parse_tokens_cell(row["tokens"], where=str(path))
            d["cliff_delta"] = float(row["cliff_delta"])
            for c in ("p_value", "cliff_delta_ci_low", "cliff_delta_ci_high"):
                if row.get(c) not in (None, ""):
                    d[c] = float(row[c])
            if row.get("cliff_delta_seed") not in (None, ""):
                d["cliff_delta_seed"] = float(row["cliff_delta_seed"])
            out.append(d)
    return out


def bias_csv_name(top_n: int, token_num: int, exclude_shared: bool = False,
                  attribution: str = PAPER_ATTRIBUTION) -> str:
    """``token_bias_top{n}_num{k}_cliff[_noshared][_<attribution>].csv`` (in ``ExperimentPaths.bias_dir()``)."""
    return (f"token_bias_top{top_n}_num{token_num}_cliff{'_noshared' if exclude_shared else ''}"
            f"{attribution_suffix(attribution)}.csv")
