"""Bias detection for DALL-E-mini (SPEC §1 step 7, §5): Cliff's delta and the token-count comparison.

For each label (bias attribute) of an IEM, its concept tokens are the first ``token_num`` rows of section
``Top {top_n} Tokens`` of the label's TIS statistics. For every image of the neutral-prompt set
(``datasets/doctor_original/information/results_none.csv``, column ``indices``) we count the positions whose
token id is in the label's set, then compare the labels' per-image counts with Cliff's delta.

Cliff's delta, its p-value and bootstrap CI: :mod:`cortex.analysis.cliffs_delta`; the table: :mod:`cortex.analysis.bias_files`.

Row of label k: ``cliff_delta = delta(counts_k, counts_rest)`` where ``counts_rest`` counts, per image, the
tokens of the other labels' sets (for the two labels of DALL-E-mini: the other label's counts). A
positive value means the neutral-prompt images carry label k's concept tokens more often than the other
label's: the generator leans towards attribute k. With two labels the two rows are opposite.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..attribution.attributions import print_smoothgrad_caveat
from ..attribution.tis import check_iem_not_near_chance
from ..data.formats import codebook_size, n_positions
from ..figures import MAX_WIDTH_IN, _plt, save_figure
from ..data.list_csv import fast_int_list_csv, int_lists, split_label_counts
from ..paths import label_files
from ..provenance import SOURCE_FILE, dataset_hashes, write_output_record
from .significance import check_current_run
from ..utils import CortexError, file_sha256, parse_int_list
from .bias_files import BiasRow, bias_csv_name, read_bias_csv, write_bias_csv
from .cliffs_delta import N_BOOT, bootstrap_ci, cliffs_delta_mwu, magnitude
from .replicates import found_seeds, seed_paths, write_bias_robustness
from .statistics_files import read_stats_section



# ----------------------------------------------------------------------------- Cliff's delta



















# ----------------------------------------------------------------------------- the neutral-prompt set

def read_neutral_set(path, n_pos: int | None = None, n_codes: int | None = None
                     ) -> tuple[list[str], np.ndarray | list[np.ndarray]]:
    """``(filenames, ids)`` of a neutral-prompt CSV with an ``indices`` column.

    ids: ``(N, L)`` int64 when every image has L ids (the usual 256), else a list of N arrays.
    ``filename`` is optional (row numbers are used when absent); other columns are ignored. Well-formed
    files are read in one pass (``cortex.data.list_csv.fast_int_list_csv``; linear in the images); otherwise the
    csv module's reader names the bad line. Given ``n_pos`` (ids per image) and ``n_codes`` (codebook size),
    a row with another number of ids, a negative id or one >= ``n_codes`` is a CortexError naming file:line.
    """
    names, ids, where = _read_neutral_rows(path)
    bad = _bad_neutral_row(ids, n_pos, n_codes)
    if bad is not None:
        i, why = bad
        need = (f"{n_pos} " if n_pos else "") + "token ids of the generator's codebook" + (
            f" (0..{n_codes - 1})" if n_codes else "")
        raise CortexError(f"{where(i)}: {why}; every neutral-prompt image needs {need}: fix or drop this row, or "
                          f"rebuild the set with generate_dataset.py")
    return names, ids


def _bad_neutral_row(ids, n_pos, n_codes) -> tuple[int, str] | None:
    """``(row index, what is wrong)`` of the first bad row of a neutral set, or None."""
    rows = [ids] if isinstance(ids, np.ndarray) else None
    if rows is not None:  # (N, L): one length for all
        if ids.size == 0:
            return None
        if n_pos is not None and ids.shape[1] != n_pos:
            return 0, f"{ids.shape[1]} token ids, expected {n_pos}"
        lo = np.flatnonzero(ids.min(axis=1) < 0)
        hi = np.flatnonzero(ids.max(axis=1) >= n_codes) if n_codes else np.zeros(0, int)
        if lo.size or hi.size:
            i = int(min(lo[:1].tolist() + hi[:1].tolist()))
            v = int(ids[i].min()) if ids[i].min() < 0 else int(ids[i].max())
            return i, f"token id {v} is outside the codebook" + (f" (it has {n_codes} codes)" if n_codes else "")
        return None
    for i, r in enumerate(ids):
        if n_pos is not None and r.size != n_pos:
            return i, f"{r.size} token ids, expected {n_pos}"
        if r.size and (r.min() < 0 or (n_codes and r.max() >= n_codes)):
            v = int(r.min()) if r.min() < 0 else int(r.max())
            return i, f"token id {v} is outside the codebook" + (f" (it has {n_codes} codes)" if n_codes else "")
    return None


def _read_neutral_rows(path):
    """``(names, ids, where)``: read_neutral_set's parse; ``where(i)``: ``file:line`` of row ``i``."""
    path = Path(path)
    if not path.exists():
        raise CortexError(f"neutral-prompt set not found: {path}. Build it with generate_dataset.py "
                          f"(--source synthetic, or --source images --neutral_image_dir DIR), or pass --neutral_csv.")
    fast = fast_int_list_csv(path, "indices", n_values=None)
    if fast is not None:
        header, prefix, ids = fast
        j = header.index("indices")
        if "filename" not in header[j:]:
            given = prefix[header.index("filename")].tolist() if "filename" in header else [""] * len(ids)
            # the one-pass parse takes only files of one header line and one line per row
            return [name or f"row_{i + 1}" for i, name in enumerate(given)], ids, lambda i: f"{path}:{i + 2}"
    names, texts, where = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [h.strip() for h in (reader.fieldnames or [])]
        if "indices" not in fields:
            raise CortexError(f"{path}: no 'indices' column (header {reader.fieldnames}); the neutral-prompt CSV "
                              f"needs one quoted token-id list per image, e.g. filename,indices")
        reader.fieldnames = fields
        for lineno, row in enumerate(reader, start=2):
            text = row.get("indices")
            if text is None or not text.strip():
                raise CortexError(f"{path}:{lineno}: empty 'indices' field")
            texts.append(text)
            where.append(f"{path}:{lineno}")
            names.append(row.get("filename") or f"row_{lineno - 1}")
    if not texts:
        raise CortexError(f"{path}: no rows; the neutral-prompt set is empty")
    ids = int_lists(texts)  # (N, L) in one parse, or None: ragged or malformed rows, parsed one by one
    ids = ids if ids is not None else [parse_int_list(t, where=w) for t, w in zip(texts, where)]
    return names, ids, lambda i: where[i]


def count_hits(ids_per_image, tokens) -> np.ndarray:
    """Per image, the number of positions whose token id is in ``tokens``: ``(N,)`` int64.

    ids_per_image: ``(N, L)`` ids (one vectorised ``np.isin``) or N arrays of any lengths (concatenated,
    one ``np.isin``, summed per image).
    """
    toks = np.unique(np.asarray([int(t) for t in tokens], dtype=np.int64))  # (K,)
    if isinstance(ids_per_image, np.ndarray) and ids_per_image.ndim == 2:
        return _is_token(ids_per_image, toks).sum(axis=1, dtype=np.int64)  # (N, L) -> (N,)
    rows = [np.asarray(r, dtype=np.int64).ravel() for r in ids_per_image]
    if not rows:
        return np.zeros(0, np.int64)
    lengths = np.array([r.size for r in rows])  # (N,)
    hits = _is_token(np.concatenate(rows), toks)  # (sum L,)
    return np.bincount(np.repeat(np.arange(len(rows)), lengths), weights=hits, minlength=len(rows)).astype(np.int64)


def _is_token(ids: np.ndarray, toks: np.ndarray) -> np.ndarray:
    """``np.isin(ids, toks)`` (any shape): one gather from a boolean table over the id range when the ids are
    non-negative and below 2**24 (token ids of a codebook), else ``np.isin``."""
    if ids.size == 0 or ids.min() < 0 or ids.max() >= 1 << 24:
        return np.isin(ids, toks)
    table = np.zeros(int(ids.max()) + 1, bool)  # (V,)
    table[toks[(toks >= 0) & (toks < table.size)]] = True
    return table[ids]


# ----------------------------------------------------------------------------- detection







def drop_shared(label_tokens: dict) -> dict:
    """Each label's tokens without those that also are in another label's set (order kept)."""
    seen: dict[int, int] = {}
    for toks in label_tokens.values():
        for t in set(int(t) for t in toks):
            seen[t] = seen.get(t, 0) + 1
    out = {k: [int(t) for t in toks if seen[int(t)] == 1] for k, toks in label_tokens.items()}
    for k, toks in out.items():
        if not toks:
            raise CortexError(f"--exclude_shared: every token of label {k} ({list(label_tokens[k])}) is also in another "
                              f"label's set; raise --token_num or drop --exclude_shared")
    return out


def detect_bias(label_tokens: dict, ids_per_image, exclude_shared: bool = False, n_boot: int = N_BOOT,
                seed: int = 0) -> list[BiasRow]:
    """label_tokens: ``{label: [token ids]}`` (two or more labels); ids_per_image: the neutral set.

    Row of label k: Cliff's delta of its per-image counts against the counts of the other labels'
    tokens (their union). exclude_shared: first drop the tokens listed for more than one label (they
    cannot tell the labels apart; off by default, as the seed). Returns one ``BiasRow`` per label, in
    ascending label order (the authors' script wrote its rows in ``os.listdir`` order, i.e. unspecified),
    with the Mann-Whitney p-value and a bootstrap CI (``n_boot`` resamples, ``seed``; 0 resamples: no CI).
    """
    if len(label_tokens) < 2:
        raise CortexError(f"bias detection needs the concept tokens of at least two labels, got {sorted(label_tokens)}")
    if exclude_shared:
        label_tokens = drop_shared(label_tokens)
    labels = sorted(label_tokens)
    rows, counted = [], {}  # counts per token set: with two labels, one label's rest is the other's own

    def hits(tokens) -> np.ndarray:
        key = frozenset(int(t) for t in tokens)
        if key not in counted:
            counted[key] = count_hits(ids_per_image, key)
        return counted[key]

    for k in labels:
        own = hits(label_tokens[k])
        rest = hits(set().union(*(set(label_tokens[j]) for j in labels if j != k)))
        d, p = cliffs_delta_mwu(own, rest)
        ci = bootstrap_ci(own, rest, n_boot, seed) if n_boot > 0 else (float("nan"), float("nan"))
        rows.append(BiasRow(int(k), [int(t) for t in label_tokens[k]], own, d, d / 2.0, p, ci))
    return rows








def label_names(data_dir) -> dict[int, str]:
    """``{label: name}`` from ``ground_truth.json`` / ``dataset_info.json`` (``class_names``), else ``label k``."""
    for name in ("ground_truth.json", "dataset_info.json"):
        p = Path(data_dir) / name
        if p.exists():
            d = json.loads(p.read_text())
            names = d.get("attribute_names") or d.get("class_names")
            if isinstance(names, dict):
                return {int(k): str(v) for k, v in names.items()}
            if isinstance(names, list):
                return {i: str(v) for i, v in enumerate(names)}
    return {}


def check_bias_inputs(paths, model: int, attribution: str = "smoothgrad", allow_partial: bool = False) -> dict:
    """``{label: statistics file}`` of this run, after checking the inputs.

    Refuses (CortexError) statistics that are not the current run's (``cortex.analysis.significance.check_current_run``:
    stale against their TIS run, unfinished, or from another checkpoint / dataset), and a label of the train
    split with no statistics file or a statistics file for a label the split lacks; ``allow_partial``: warn
    and use the complete labels.
    """
    stats_dir = paths.stats_dir(model, attribution)
    files = label_files(stats_dir)
    hint = f"Run TIS_computation.py and TIS_analysis.py --model {model} --bias_type {paths.bias_type} first."
    if not files:
        raise CortexError(f"no TIS statistics (label_*.csv) in {stats_dir}. {hint}")
    try:
        check_current_run(paths, model, attribution)
    except CortexError as e:
        if not allow_partial:
            raise CortexError(f"{e} (--allow_partial uses these statistics anyway, on purpose.)") from None
        print(f"warning: --allow_partial: {e}")
    expected = set(split_label_counts(paths.data_dir, "train"))
    problems = []
    if expected - set(files):
        problems.append(f"labels {sorted(expected - set(files))} of the train split have no statistics file")
    if set(files) - expected:
        problems.append(f"statistics files for labels {sorted(set(files) - expected)} the train split lacks")
    if problems:
        msg = f"{stats_dir}: " + "; ".join(problems)
        if not allow_partial:
            raise CortexError(f"{msg}. {hint} Or pass --allow_partial to compare the labels present on purpose.")
        print(f"warning: --allow_partial: {msg}")
        files = {k: v for k, v in files.items() if k in expected}
    if len(files) < 2:
        raise CortexError(f"TIS statistics of at least two labels are needed in {stats_dir} (found {len(files)}). {hint}")
    return files


def run_bias_detection(paths, model: int, top_n: int = 5, token_num: int = 10, attribution: str = "smoothgrad",
                       neutral_csv=None, plot: bool = True, exclude_shared: bool = False, allow_partial: bool = False,
                       n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """bias_detection.py's work: read the labels' concept tokens and the neutral set, write the CSV (and a figure).

    paths: ``cortex.paths.ExperimentPaths`` of experiment ``dalle``. Inputs are checked first
    (:func:`check_bias_inputs`); an IEM whose accuracy is near chance gets a loud warning. Returns
    ``{"csv": path, "figure": path | None, "rows": [BiasRow]}``.
    """


    files = check_bias_inputs(paths, model, attribution, allow_partial)
    print_smoothgrad_caveat(attribution, "bias")
    check_iem_not_near_chance(paths.best_ckpt(model), paths.testing_results(model), max(len(files), 2),
                              what="bias-detection tokens")
    label_tokens = {k: read_stats_section(p, top_n, token_num) for k, p in files.items()}
    for k, toks in label_tokens.items():
        if not toks:
            raise CortexError(f"{files[k]}: section 'Top {top_n} Tokens' has no tokens")
    neutral = Path(neutral_csv) if neutral_csv else paths.neutral_csv()

    _, ids = read_neutral_set(neutral, n_positions(paths.data_dir), codebook_size(paths.data_dir))
    rows = detect_bias(label_tokens, ids, exclude_shared, n_boot, seed)
    name = bias_csv_name(top_n, token_num, exclude_shared, attribution)
    out = write_bias_csv(paths.bias_dir() / name, rows)
    src = paths.stats_dir(model, attribution) / SOURCE_FILE
    write_output_record(out, {"dataset": dataset_hashes(paths.data_dir), "neutral_csv_sha256": file_sha256(neutral),
                              "statistics_id": json.loads(src.read_text()).get("statistics_id") if src.exists() else None})
    names = label_names(paths.data_dir)
    for r in rows:
        print(f"label {r.label} ({names.get(r.label, '?')}): {len(r.tokens)} tokens, "
              f"{r.counts.mean():.2f} per neutral image; Cliff's delta {r.cliff_delta:+.4f} "
              f"[95% CI {r.ci[0]:+.3f}, {r.ci[1]:+.3f}], Mann-Whitney p = {r.p_value:.3g} "
              f"({magnitude(r.cliff_delta)}; seed's halved value {r.cliff_delta_seed:+.4f})")
    robust = report_bias_robustness(paths, top_n, token_num, exclude_shared)
    fig = None
    if plot:
        fig = plot_bias(paths, top_n, token_num, rows=rows, name=name,
                        robustness={r["label"]: r for r in robust[1]} if robust else None)
    return {"csv": out, "figure": fig, "rows": rows, "robustness": robust[0] if robust else None}


def report_bias_robustness(paths, top_n: int, token_num: int, exclude_shared: bool = False):
    """After a bias run: compare it with every other run of these settings under ``--root`` (the other
    attributions, the seed replicates of cortex.analysis.replicates), write ``..._robustness.csv`` and print whether each
    label's direction is robust. Returns ``(csv path, rows)``; None when only one run exists or
    ``--results_dir`` points outside the seed folders."""
    known = {seed_paths("dalle", paths.root, s, paths.bias_type).bias_dir() for s in found_seeds(paths.root,
                                                                                                  paths.bias_type)}
    if paths.bias_dir() not in known:
        return None
    res = write_bias_robustness(paths.root, paths.bias_type, top_n, token_num, exclude_shared)
    if res is None:
        return None
    out, rows = res
    for r in rows:
        print(f"label {r['label']}: direction {r['direction']} over {r['runs']} runs (seeds x attributions): "
              f"{r['verdict']}" + ("" if r["verdict"] == "robust" else f" ({r['per_run']})"))
    print(f"wrote {out}")
    return out, rows


# ----------------------------------------------------------------------------- figure

def _planted(data_dir) -> dict[int, set]:
    p = Path(data_dir) / "ground_truth.json"
    if not p.exists():
        return {}
    gt = json.loads(p.read_text())
    return {int(k): set(v) for k, v in gt.get("concept_tokens", {}).items()}


def plot_bias(paths, top_n: int, token_num: int, rows: list[BiasRow] | None = None, out=None,
              name: str | None = None, robustness: dict | None = None) -> Path:
    """Figure of the bias detection, saved (Agg) beside the CSV as ``token_bias_top{n}_num{k}_cliff.png``.

    Left: Cliff's delta per label of *this* run only (``rows``, or this run's CSV ``name``; never another
    bias type's or an earlier run's file), with its bootstrap 95% CI as an error bar, the Mann-Whitney p and
    the size label above each bar, the label's tokens under it (``*`` = a planted attribute token of the
    synthetic world). Right: the per-image token counts of the labels over the neutral-prompt set.
    ``robustness``: ``{label: cortex.analysis.replicates.bias_robustness row}``; a direction that is not the same on every
    run found (seeds x attributions) gets "not robust (k/n runs)" in red under its bar.
    """
    plt = _plt()
    name = name or bias_csv_name(top_n, token_num)
    own = [dict(label=r.label, tokens=r.tokens, cliff_delta=r.cliff_delta, p_value=r.p_value,
                cliff_delta_ci_low=r.ci[0], cliff_delta_ci_high=r.ci[1]) for r in rows] if rows is not None \
        else read_bias_csv(paths.bias_dir() / name)
    results = {paths.bias_type: (own, label_names(paths.data_dir), _planted(paths.data_dir))}

    fig, axes = plt.subplots(1, 2 if rows is not None else 1, figsize=(MAX_WIDTH_IN if rows is not None else 3.5, 3.6),
                             squeeze=False)
    ax = axes[0, 0]
    xt, xl, x = [], [], 0.0
    colours = {0: "#3b6ea8", 1: "#c8553d"}
    for bt, (rs, names, planted) in results.items():
        for r in rs:
            d = r["cliff_delta"]
            lo, hi = r.get("cliff_delta_ci_low", float("nan")), r.get("cliff_delta_ci_high", float("nan"))
            err = None if np.isnan(lo) else [[max(d - lo, 0.0)], [max(hi - d, 0.0)]]
            ax.bar(x, d, width=0.8, color=colours.get(r["label"] % 2, "grey"), edgecolor="black", yerr=err,
                   capsize=3)
            tip = hi if d >= 0 and err is not None else (lo if err is not None else d)
            p = r.get("p_value", float("nan"))
            ax.text(x, tip + (0.03 if d >= 0 else -0.03), f"{d:+.2f} ({magnitude(d)})" +
                    ("" if np.isnan(p) else f"\np={p:.2g}"), ha="center", va="bottom" if d >= 0 else "top", fontsize=7)
            toks = [f"{t}*" if t in planted.get(r["label"], ()) else str(t) for t in r["tokens"]]
            lines = [", ".join(toks[i:i + 4]) for i in range(0, len(toks), 4)]
            xt.append(x)
            xl.append(f"label {r['label']} ({names.get(r['label'], '?')})\n" + "\n".join(lines))
            rb = (robustness or {}).get(r["label"])
            if rb and rb["verdict"] == "not robust":
                ax.text(x, -1.05 if d >= 0 else 1.05, f"not robust: {rb['runs_agree']}/{rb['runs']} runs agree",
                        ha="center", va="bottom" if d >= 0 else "top", fontsize=7, color="#b00020", fontweight="bold")
            x += 1.0
        x += 0.6
    ax.axhline(0, color="black", lw=0.8)
    for t in (0.147, 0.33, 0.474):
        ax.axhline(t, color="grey", ls=":", lw=0.6)
        ax.axhline(-t, color="grey", ls=":", lw=0.6)
    ax.set_xticks(xt)
    ax.set_xticklabels(xl, fontsize=7)
    ax.set_ylim(-1.1, 1.1)
    ax.set_ylabel("Cliff's δ, bootstrap 95% CI")
    ax.set_xlabel("label: its tokens (* planted)")
    tis = Path(name).stem.partition("_cliff")[2].lstrip("_") or "smoothgrad"  # the attribution (file suffix)
    ax.set_title(f"{paths.bias_type}, {tis}: top {top_n}, {token_num} tokens")
    if rows is not None:
        ax2 = axes[0, 1]
        names = results[paths.bias_type][1]
        hi = max(int(r.counts.max()) for r in rows)
        bins = np.arange(-0.5, hi + 1.5, 1.0) if hi < 60 else 40
        for r in rows:
            ax2.hist(r.counts, bins=bins, alpha=0.55, color=colours.get(r.label % 2, "grey"),
                     label=f"label {r.label} ({names.get(r.label, '?')}): mean {r.counts.mean():.2f}")
        ax2.set_xlabel("label's tokens per neutral image")
        ax2.set_ylabel("images")
        ax2.set_title(f"token counts, {rows[0].counts.size} neutral images")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out) if out else paths.bias_dir() / name.replace(".csv", ".png")
    return save_figure(fig, out)


def plot_ratio_sweep(rows: list[dict], out) -> Path:
    """Cliff's delta of label 0 against the planted bias ratio (fraction of neutral images with attribute 0).

    rows: dicts with keys ``bias_type``, ``method`` (e.g. the attribution), ``ratio``, ``cliff_delta``.
    The ideal for perfectly recovered token sets of equal size is about ``2 ratio - 1`` (dashed).
    Saved with the Agg backend to ``out``.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["bias_type"], r["method"]), []).append((float(r["ratio"]), float(r["cliff_delta"])))
    styles = ["-o", "--s", "-.^", ":v", "-D", "--x"]
    for i, ((bt, method), pts) in enumerate(sorted(groups.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[i % len(styles)], label=f"{bt}, {method}")
    xs = np.linspace(0, 1, 11)
    ax.plot(xs, 2 * xs - 1, color="grey", lw=0.8, ls="--", label="2 ratio - 1")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("planted bias ratio (neutral images carrying attribute 0)")
    ax.set_ylabel("Cliff's delta of label 0 (standard)")
    ax.set_ylim(-1.05, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("Cliff's delta vs planted bias ratio (synthetic world)")
    fig.tight_layout()
    return save_figure(fig, out)
