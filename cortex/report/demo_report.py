"""The demo's report (``results/demo_report.md``): every number read from the files ``make demo``'s steps wrote.

:func:`report` formats it: the across-seeds tables first (``cortex.analysis.replicates``), then seed 0's IEM
accuracy, concept recovery, significance, bias detection and the evaluation in detail, with the figures.
``cortex/demo.py`` runs the steps and calls it.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..analysis.bias_files import bias_csv_name, parse_tokens_cell, read_bias_csv
from ..analysis.replicates import (bias_robustness, bias_robustness_file, bias_runs, fmt_interval, read_run_tokens,
                                   seed_paths, summarize, token_stability, verdict)
from ..evaluation.concept_level import read_paired_stats
from ..paths import ExperimentPaths

DALLE_ATTRIBUTIONS = ("smoothgrad", "smoothgrad_x_input")
# the report's sections from this heading on are not copied into the README (scripts/check_readme_demo.py)
DETAIL_HEADING = "## Seed 0's evaluation in detail (this report only)"


def bias_file(attr: str) -> str:
    return bias_csv_name(5, 10, attribution=attr)


@dataclass
class Roots:
    """Experiment folders of the demo: the repo's own by default, a scratch folder in the tests."""

    vqgan: Path
    scattered: Path
    dalle: Path

    @classmethod
    def under(cls, work: Path) -> "Roots":
        vq = work / "VQGAN_explanation"
        return cls(vq, vq / "scattered_world", work / "Dalle_explanation")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def machine_line() -> str:
    """``Machine: <CPU model>, <n> cores, torch <version>, <date>``: the numbers' last digits depend on the CPU."""
    import platform
    from datetime import date

    import torch

    cpu = ""
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine() or "unknown CPU"
    # the kernels' instruction set is part of "the CPU": ATen's and oneDNN's (capped by ATEN_CPU_CAPABILITY /
    # ONEDNN_MAX_CPU_ISA, e.g. to compute as an AVX2-only CPU does) round differently
    isa = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        isa += f" + oneDNN {os.environ['ONEDNN_MAX_CPU_ISA']}"
    return (f"Machine: {cpu} [{isa}], {os.cpu_count()} cores, torch {torch.__version__}, {date.today().isoformat()} "
            "(another CPU or torch build changes the last digits)")


def _significance_section(roots: Roots, out: Path) -> list[str]:
    """The label-contrast test of the concept tokens (BH q < 0.05) against the planted truth, null labels
    included; the within-image enrichment test's null-label discoveries for comparison; the null labels'
    p-value figure (the calibration check)."""
    lines = ["", "## Significant concept tokens (label-contrast test, BH q < 0.05): recall of the planted tokens, false "
             "share among the planted labels' significant tokens, and significant tokens on the labels with no "
             "planted concept", "",
             "| world | TIS | top n | recall | false share | significant tokens per null label | null labels with any |",
             "|---|---|---|---|---|---|---|"]
    enrichment, figures = [], []
    for world, root in (("object", roots.vqgan), ("scattered", roots.scattered)):
        ex = ExperimentPaths(root=root).results_dir / "Explanation"
        for name, into in (("concept_recovery_significance.csv", lines), ("concept_recovery_enrichment.csv", enrichment)):
            for r in (_rows(ex / name) if (ex / name).exists() else []):
                if r["label"] == "mean" and r["top_n"] in ("5", "20"):
                    if into is lines:
                        lines.append(f"| {world} | {r['method']} | {r['top_n']} | {float(r['recall']):.2f} | "
                                     f"{float(r['fdp']):.2f} | {float(r['null_discoveries']):.2f} | "
                                     f"{float(r['null_labels_with_discovery']):.2f} |")
                    else:
                        enrichment.append(f"{world} {r['method']} top {r['top_n']}: recall {float(r['recall']):.2f}, "
                                          f"false share {float(r['fdp']):.2f}, {float(r['null_discoveries']):.2f} "
                                          f"per null label")
        if (ex / "null_label_pvalues.png").exists():
            figures.append(f"![null-label p-values, {world} world]"
                           f"({os.path.relpath(ex / 'null_label_pvalues.png', out.parent)})")
    if enrichment:
        lines += ["", "For comparison, the within-image enrichment test (`tis_enrichment.csv`, not calibrated for "
                  "concepts): " + "; ".join(enrichment) + "."]
    if figures:
        lines += ["", "Null labels' p-values of the label-contrast test (histogram, and QQ plot against the uniform: "
                  "a calibrated test stays on or below the diagonal):", ""] + figures
    return lines


def _paired_section(conc: Path) -> list[str]:
    """Per image, CORTEX's drop minus the baseline's drop, with its 95% confidence interval."""
    lines = ["", "Paired per image (CORTEX's logit drop minus the baseline's), mean and 95% Student-t interval:", "",
             "| evaluator | mean paired difference | 95% CI | images |", "|---|---|---|---|"]
    for r in read_paired_stats(conc):
        if r["Metric"] == "logit_drop":
            lines.append(f"| {r['Model']} | {r['Mean_Paired_Diff']:+.2f} | [{r['CI_Low']:+.2f}, {r['CI_High']:+.2f}] "
                         f"| {r['N']} |")
    return lines


def _randomisation_section(path: Path) -> list[str]:
    """Cascading model randomisation: Spearman correlation of the TIS with the trained IEM's."""
    rows = _rows(path)
    lines = ["", "## Sanity check: cascading model randomisation (Spearman correlation of an image's 256 TIS with "
             "the trained IEM's; a sound attribution falls towards 0)", "",
             "| TIS | output layer randomised | half the layers | all layers |", "|---|---|---|---|"]
    for attr in dict.fromkeys(r["attribution"] for r in rows):
        st = sorted((r for r in rows if r["attribution"] == attr), key=lambda r: int(r["stage"]))
        pick = [st[min(1, len(st) - 1)], st[len(st) // 2], st[-1]]
        lines.append(f"| {attr} | " + " | ".join(f"{float(r['spearman_mean']):.2f}" for r in pick) + " |")
    return lines


def _replicates_sections(roots: Roots, seeds: list[int]) -> list[str]:
    """Headline numbers as mean [min, max] over the seeds, the conclusions' verdicts, and the concept tokens'
    stability across seeds (cortex.analysis.replicates)."""
    vq = {s: seed_paths("vqgan", roots.vqgan, s) for s in seeds}
    lines = ["", "## Across seeds: IEM trained and TIS computed once per seed on the same data; mean [min, max] over "
             "the seeds, and whether the conclusion holds on every seed", "",
             f"Seeds {', '.join(map(str, seeds))} (`python -m cortex.demo --seeds ...`); seed s > 0 wrote "
             "`results/replicates/seed_<s>/` and `checkpoints/replicates/seed_<s>/`.", "",
             "| quantity | mean [min, max] | per seed | holds on every seed |", "|---|---|---|---|"]

    def row(name, values, spec=".2f", flags=None):
        lines.append(f"| {name} | {fmt_interval(summarize(values), spec)} | "
                     + " / ".join(f"{v:{spec}}" for v in values) + f" | {verdict(flags) if flags is not None else ''} |")

    row("VQGAN object world: Net1 test top-1 (%)",
        [float(_rows(vq[s].testing_results(1))[0]["Top-1 Accuracy"]) for s in seeds], ".1f")
    rec = {s: {(r["method"], r["top_n"]): float(r["precision"])
               for r in _rows(vq[s].results_dir / "Explanation/concept_recovery.csv") if r["label"] == "mean"}
           for s in seeds}
    base = [rec[s][("frequency_baseline", next(t for m, t in rec[s] if m == "frequency_baseline"))] for s in seeds]
    for attr in DALLE_ATTRIBUTIONS:
        vals = [rec[s][(attr, "5")] for s in seeds]
        row(f"object world: {attr} top-5 precision@k, above the frequency baseline", vals, ".2f",
            [v > b for v, b in zip(vals, base)])
    sig = {s: {r["top_n"]: r for r in _rows(vq[s].results_dir / "Explanation/concept_recovery_significance.csv")
               if r["label"] == "mean" and r["method"] == "smoothgrad_x_input"} for s in seeds}
    if all("20" in sig[s] for s in seeds):
        rs = [sig[s]["20"] for s in seeds]
        row("object world: smoothgrad_x_input top-20 significant tokens (q < 0.05): recall, with false share "
            "<= 0.05 and no token on a null label", [float(r["recall"]) for r in rs], ".2f",
            [float(r["fdp"]) <= 0.05 and float(r["null_discoveries"]) == 0 for r in rs])
    conc = {s: next(p for p in sorted(vq[s].explanation_dir(1).glob("sample_concept_level_results_top*_token*.csv"))
                    if not p.stem.endswith("_paired")) for s in seeds}
    paired = {s: [r for r in read_paired_stats(conc[s]) if r["Metric"] == "logit_drop"] for s in seeds}
    for ev in [r["Model"] for r in paired[seeds[0]]]:
        rs = [next(r for r in paired[s] if r["Model"] == ev) for s in seeds]
        row(f"concept level, {ev}: CORTEX minus baseline logit drop, paired 95% CI above 0",
            [r["Mean_Paired_Diff"] for r in rs], "+.2f", [r["CI_Low"] > 0 for r in rs])
    stab_rows = []
    for bt in ("doctor_gender", "doctor_color"):
        da = {s: seed_paths("dalle", roots.dalle, s, bt) for s in seeds}
        row(f"DALL-E-mini {bt}: Net1 test accuracy (%)",
            [float(_rows(da[s].testing_results(1))[0]["Accuracy"]) for s in seeds], ".1f")
        gt = json.loads((da[0].data_dir / "ground_truth.json").read_text())
        want = gt["expected_direction"]["sign_of_cliff_delta_label_0"]
        runs = []
        for attr in DALLE_ATTRIBUTIONS:
            r0 = [next(r for r in read_bias_csv(da[s].bias_dir() / bias_file(attr)) if r["label"] == 0) for s in seeds]
            runs += r0
            row(f"{bt}, {attr}: Cliff's δ of label 0, planted direction found", [r["cliff_delta"] for r in r0],
                "+.3f", [r["cliff_delta"] * want > 0 for r in r0])
        sign = 1 if summarize([r["cliff_delta"] for r in runs])["mean"] >= 0 else -1
        row(f"{bt}: one direction on every seed and TIS, 95% CI excluding 0", [r["cliff_delta"] for r in runs],
            "+.3f", [r["cliff_delta"] * sign > 0 and (r["cliff_delta_ci_low"] > 0 or r["cliff_delta_ci_high"] < 0)
                     for r in runs])
        for attr in DALLE_ATTRIBUTIONS:
            stab_rows.append((f"DALL-E-mini {bt}", attr, 5, 10,
                              {s: read_run_tokens(da[s].stats_dir(1, attr), 5, 10) for s in seeds}))
    gt = json.loads((roots.vqgan / "datasets/ground_truth.json").read_text())
    k = max(len(v) for v in gt["concept_tokens"].values())
    for attr in DALLE_ATTRIBUTIONS:
        stab_rows.insert(0 if attr == DALLE_ATTRIBUTIONS[0] else 1,
                         ("VQGAN object world", attr, 5, k, {s: read_run_tokens(vq[s].stats_dir(1, attr), 5, k)
                                                             for s in seeds}))
    lines += ["", "## Stability of the concept tokens across seeds: mean pairwise Jaccard overlap of each label's "
              "top-k tokens (section Top 5; 1 = the same tokens on every seed, 0 = disjoint)", "",
              "| experiment | TIS | k | mean over labels | lowest label | labels with the same k tokens on every seed |",
              "|---|---|---|---|---|---|"]
    for name, attr, top_n, kk, tokens in stab_rows:
        st = token_stability(tokens)
        js = [v["jaccard"] for v in st.values()]
        same = sum(1 for v in st.values() if v["jaccard"] == 1.0)
        lines.append(f"| {name} | {attr} | {kk} | {sum(js) / len(js):.2f} | {min(js):.2f} | {same}/{len(js)} |")
    return lines


def report(roots: Roots, out: Path, seeds=None) -> str:
    """Read every number from the files the steps wrote and format one markdown report."""
    lines = ["# CORTEX demo report", "",
             "Synthetic worlds generated, explained and evaluated by `make demo`; every number below is read "
             "from the files the pipeline wrote. The tables after the first two are seed 0's run; the first two "
             "give each headline number over the seed replicates.", "", machine_line(), ""]
    seeds = sorted(seeds) if seeds is not None else [0]
    if len(seeds) > 1:
        lines += _replicates_sections(roots, seeds)[1:] + [""]
    # 1. IEM accuracy
    lines += ["## IEM accuracy (test split)", "", "| experiment | IEM | top-1 | top-3 | chance |", "|---|---|---|---|---|"]
    for name, root in (("VQGAN, object world", roots.vqgan), ("VQGAN, scattered world", roots.scattered)):
        paths = ExperimentPaths(root=root)
        r = _rows(paths.testing_results(1))[0]
        k = json.loads((paths.data_dir / "dataset_info.json").read_text())["num_classes"]
        lines.append(f"| {name} | Net1 | {float(r['Top-1 Accuracy']):.1f}% | {float(r['Top-3 Accuracy']):.1f}% | "
                     f"{100 / k:.1f}% |")
    for bt in ("doctor_gender", "doctor_color"):
        r = _rows(ExperimentPaths("dalle", roots.dalle, bt).testing_results(1))[0]
        lines.append(f"| DALL-E-mini, {bt} | Net1 | {float(r['Accuracy']):.1f}% | | 50.0% |")
    # 2. concept recovery
    lines += ["", "## Concept recovery: precision@k of the planted concept tokens (k = planted tokens per label)", "",
              "| method | object world | scattered world |", "|---|---|---|"]
    table = {}
    for world, root in (("object", roots.vqgan), ("scattered", roots.scattered)):
        for r in _rows(ExperimentPaths(root=root).results_dir / "Explanation/concept_recovery.csv"):
            if r["label"] == "mean":
                key = r["method"] + (f" (top {r['top_n']})" if r["top_n"] not in ("", "-") else "")
                table.setdefault(key, {})[world] = float(r["precision"])
    for key, v in table.items():
        lines.append(f"| {key} | {v.get('object', float('nan')):.2f} | {v.get('scattered', float('nan')):.2f} |")
    lines += _significance_section(roots, out)
    # 4. bias detection
    lines += ["", "## Bias detection (DALL-E-mini synthetic world; neutral prompt planted to lean to label 0)", "",
              "| bias type | TIS | label | tokens in the label's set that are planted attribute tokens | mean hits / image "
              "| Cliff's δ [95% CI] | p | seed's δ/2 | planted direction found | direction across seeds and TIS |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for bt in ("doctor_gender", "doctor_color"):
        paths = ExperimentPaths("dalle", roots.dalle, bt)
        gt = json.loads((paths.data_dir / "ground_truth.json").read_text())
        want = gt["expected_direction"]["sign_of_cliff_delta_label_0"]
        # the robustness CSV's verdict, recomputed from the runs' bias tables: k/n counts the runs with its sign
        # and a 95% CI excluding 0 (runs_agree, which the CSV does not store); no CSV: fewer than two runs
        rob = {str(r["label"]): f"{r['verdict']} ({r['runs_agree']}/{r['runs']})"
               for r in bias_robustness(bias_runs(roots.dalle, bt, 5, 10))} \
            if bias_robustness_file(roots.dalle, bt, 5, 10).exists() else {}
        for attr, r in [(a, r) for a in DALLE_ATTRIBUTIONS
                        for r in _rows(paths.bias_dir() / bias_file(a))]:
            label, delta = r["label"], float(r["cliff_delta"])
            tokens = parse_tokens_cell(r["tokens"])
            planted = sum(t in set(gt["concept_tokens"][label]) for t in tokens)
            sign = want if label == "0" else -want
            lines.append(f"| {bt} | {attr} | {label} ({gt['attribute_names'][label]}) | {planted}/{len(tokens)} | "
                         f"{float(r['average_frequency_per_file']):.2f} | {delta:+.3f} "
                         f"[{float(r['cliff_delta_ci_low']):+.2f}, {float(r['cliff_delta_ci_high']):+.2f}] | "
                         f"{float(r['p_value']):.2g} | "
                         f"{float(r.get('cliff_delta_seed', 'nan')):+.3f} | {'yes' if delta * sign > 0 else 'no'} | "
                         f"{rob.get(label, 'one run only')} |")
    # seed 0's evaluation in detail: in the report only (scripts/check_readme_demo.py copies the tables above)
    lines += ["", DETAIL_HEADING, "", "Masking and optimisation with the synthetic evaluators, seed 0's run; "
              "the concept level over all seeds is in the first table."]
    # 3. evaluation with the synthetic evaluators
    ex = ExperimentPaths(root=roots.vqgan).explanation_dir(1)
    rows = _rows(ex / "sample_image_level_results.csv")
    ns = sorted({int(r["Num_Masked_Tokens"]) for r in rows if r["Method"] != "original"})
    show = [n for n in (10, 20, 30) if n in ns] or ns[:3]
    lines += ["", "## Deletion: evaluators' target probability after masking the tokens at the top-n TIS positions vs "
              "n random positions", "",
              "| evaluator | unmasked | " + " | ".join(f"TIS n={n} | random n={n}" for n in show) + " |",
              "|---|---|" + "---|---|" * len(show)]
    for ev in dict.fromkeys(r["Model"] for r in rows):
        get = lambda m, n=None: next(float(r["Avg_Probs"]) for r in rows if r["Model"] == ev and r["Method"] == m
                                     and (n is None or int(r["Num_Masked_Tokens"]) == n))
        lines.append(f"| {ev} | {get('original'):.3f} | "
                     + " | ".join(f"{get('target', n):.3f} | {get('random', n):.3f}" for n in show) + " |")
    conc = next(p for p in sorted(ex.glob("sample_concept_level_results_top*_token*.csv"))
                if not p.stem.endswith("_paired"))
    lines += ["", f"## Concept-level masking ({conc.stem.split('results_')[1]}): drop of the target logit when the "
              "label's CORTEX concept tokens vs its frequency-baseline tokens are masked", "",
              "| evaluator | original prob | CORTEX: logit drop | baseline: logit drop | CORTEX: prob | baseline: prob |",
              "|---|---|---|---|---|---|"]
    for r in _rows(conc):
        lines.append(f"| {r['Model']} | {float(r['Avg_Original_Prob']):.3f} | {float(r['Avg_Diff_Target']):.2f} | "
                     f"{float(r['Avg_Diff_Baseline']):.2f} | {float(r['Avg_Masked_Prob_Target']):.3f} | "
                     f"{float(r['Avg_Masked_Prob_Baseline']):.3f} |")
    lines += _paired_section(conc)
    cb = next(ex.glob("codebook_level_results_token_*.csv"))
    lines += ["", f"## Codebook-level optimisation ({cb.stem.split('results_')[1]}): target-label probability "
              "before and after optimising the 4x4 region's tokens", "",
              "| evaluator | initial target prob | final target prob | gain |", "|---|---|---|---|"]
    for r in _rows(cb):
        i, f = float(r["initial_target_prob"]), float(r["final_target_prob"])
        lines.append(f"| {r['model']} | {i:.3f} | {f:.3f} | {f - i:+.3f} |")
    lines += _randomisation_section(ex / "model_randomisation.csv")
    figures = (sorted((ex / "figures").glob("*.png")) + sorted(ex.glob("model_randomisation*.png"))
               + sorted(roots.dalle.glob("results/*/Bias_detection/*.png"))
               + [p for r in (roots.vqgan, roots.scattered, roots.dalle)
                  for p in sorted(r.glob("checkpoints/**/loss_curves.png"))])
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{p.stem}]({os.path.relpath(p, out.parent)})" for p in figures]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
