"""``cxr-edge calibrate``: refit a bundle's per-label thresholds on a site's own labelled images, torch-free.

The bundle runs on the images, then :func:`cxr_edge.operating_points.choose_thresholds` (the same
code the export toolchain uses) fits each label's threshold with the chosen rule, and applies the
same "undetermined" rule: fewer than ``--min-positive-patients`` distinct positive patients, or an
AUC whose 95% patient-bootstrap interval is not above 0.5, gives a ``null`` threshold. The new
bundle is the same ONNX graph and weights (same ``model_sha256``) with a new manifest: the new
thresholds, and ``provenance.recalibration`` recording the rule, counts and per-label numbers
(no file names, no patient ids). With ``--temperature``, per-label temperature scaling is refitted
first (:mod:`cxr_edge.temperature`: folded into the head's weights, so ``model_sha256`` changes and
``provenance.temperature`` records the total), and the thresholds are fitted on those probabilities.

``labels.csv``: a header row with ``image`` (the file name; a path's last component is used),
optionally ``patient_id`` (default: one patient per image), and one column per bundle label,
spelled in any case/spacing ("pleural thickening" = "Pleural_Thickening"), holding 1, 0 or
blank (unknown). Columns that match no label are reported and ignored.

Sensitivity, specificity and PPV are reported at the new thresholds with 95% patient-bootstrap
intervals. They are measured on the images the thresholds were fitted on, so they are optimistic;
a separate set of images gives honest numbers (run ``calibrate`` on one set and evaluate on another).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .classifier import SCHEMA_VERSION
from .errors import InvalidArgumentError, OutputError

ID_COLUMNS = ("image", "patient_id")


@dataclasses.dataclass
class LabelTable:
    """The parsed labels.csv: per image file name, its patient id and targets (NaN = unknown)."""

    rows: dict[str, tuple[str, np.ndarray]]
    matched_columns: dict[str, str]          # bundle label -> CSV column
    ignored_columns: list[str]
    missing_labels: list[str]
    has_patient_ids: bool
    sha256: str


def _norm(name: str) -> str:
    from .classifier import normalize_label

    return normalize_label(name)


def read_labels_csv(path: str | os.PathLike, labels: Sequence[str]) -> LabelTable:
    """Parse ``labels.csv`` (module docstring); typed errors name the row and column, never a value."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(f"--labels file cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidArgumentError("--labels file is not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise InvalidArgumentError("--labels file is empty (a header row is required)") from None
    except csv.Error as exc:
        raise InvalidArgumentError(f"--labels file is not valid CSV ({exc})") from None
    norm_header = [_norm(h) for h in header]
    if "image" not in norm_header:
        raise InvalidArgumentError("--labels needs an 'image' column (the image file name)")
    if len(set(norm_header)) != len(norm_header):
        raise InvalidArgumentError("--labels has duplicate column names")
    image_col = norm_header.index("image")
    pid_col = norm_header.index("patient_id") if "patient_id" in norm_header else None
    label_norm = {_norm(n): n for n in labels}
    matched: dict[str, int] = {}
    ignored: list[str] = []
    for j, (h, hn) in enumerate(zip(header, norm_header)):
        if hn in ID_COLUMNS:
            continue
        if hn in label_norm:
            matched[label_norm[hn]] = j
        else:
            ignored.append(h)
    rows: dict[str, tuple[str, np.ndarray]] = {}
    try:
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise InvalidArgumentError(f"--labels row {lineno} has {len(row)} fields, the header has {len(header)}")
            name = Path(row[image_col].strip().replace("\\", "/")).name
            if not name:
                raise InvalidArgumentError(f"--labels row {lineno} has an empty 'image'")
            if name in rows:
                raise InvalidArgumentError(f"--labels row {lineno}: image file name appears twice")
            targets = np.full(len(labels), np.nan, dtype=np.float32)
            for k, label in enumerate(labels):
                if label not in matched:
                    continue
                cell = row[matched[label]].strip()
                if cell == "":
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    value = math.nan
                if value not in (0.0, 1.0):
                    raise InvalidArgumentError(f"--labels row {lineno}, column {header[matched[label]]!r}: expected "
                                               "0, 1 or blank")
                targets[k] = value
            pid = row[pid_col].strip() if pid_col is not None else ""
            rows[name] = (pid or f"image:{name}", targets)
    except csv.Error as exc:
        raise InvalidArgumentError(f"--labels file is not valid CSV ({exc})") from None
    return LabelTable(rows=rows, matched_columns={k: header[v] for k, v in matched.items()}, ignored_columns=ignored,
                      missing_labels=[n for n in labels if n not in matched], has_patient_ids=pid_col is not None,
                      sha256=hashlib.sha256(raw).hexdigest())


def _ci(d: dict[str, Any] | None) -> str:
    if not d or d.get("value") is None:
        return "n/a"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    return f"{d['value']:.2f}{ci}"


def report_table(labels: Sequence[str], old: Sequence[float | None], new: Sequence[float | None],
                 per_label: dict[str, Any]) -> str:
    """The human per-label table printed by ``cxr-edge calibrate``."""
    head = (f"{'label':<20} {'pos.pat':>7} {'AUC [95% CI]':<20} {'old thr':>7} {'new thr':>7}  "
            f"{'sensitivity':<18} {'specificity':<18} {'PPV':<18}")
    lines = [head, "-" * len(head)]
    for name, o, n in zip(labels, old, new):
        e = per_label[name]
        auc = e.get("auc") or {}
        auc_txt = "n/a" if auc.get("auc") is None else (
            f"{auc['auc']:.3f}" + (f" [{auc['ci_low']:.2f}, {auc['ci_high']:.2f}]"
                                   if auc.get("ci_low") is not None and auc.get("ci_high") is not None else ""))
        o_txt = "undet." if o is None else f"{o:.3f}"
        if n is None:
            lines.append(f"{name:<20} {e['positive_patients']:>7} {auc_txt:<20} {o_txt:>7} {'undet.':>7}  "
                         f"undetermined: {e.get('undetermined', '')}")
            continue
        at = e.get("at_new_threshold") or {}
        lines.append(f"{name:<20} {e['positive_patients']:>7} {auc_txt:<20} {o_txt:>7} {n:>7.3f}  "
                     f"{_ci(at.get('sensitivity')):<18} {_ci(at.get('specificity')):<18} {_ci(at.get('ppv')):<18}")
    return "\n".join(lines)


def write_verified_bundle(model_bytes: bytes, manifest, out: str | os.PathLike, sign_key=None):
    """Write ``manifest`` into ``model_bytes`` (graph bytes unchanged; :func:`~cxr_edge.bundle.write_bundle`
    replaces the manifest entry and fills in the digests) at ``out``, atomically, after proving the new file
    loads (checksums, manifest, graph wiring, head check). Shared by ``calibrate`` and ``export.scope_fit``.

    A signature of ``model_bytes`` never carries over (it signed the old manifest); ``sign_key`` (an
    ed25519 private key) signs the new bundle, checked against its public half. Returns the loaded Bundle."""
    from .bundle import load_bundle, sign_bundle, write_bundle
    from .signature import public_key_pem

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bundle(model_bytes, manifest, tmp)
        if sign_key is not None:
            tmp.write_bytes(sign_bundle(tmp.read_bytes(), sign_key))
        written = load_bundle(tmp, threads=1, public_key=None if sign_key is None else public_key_pem(sign_key),
                              require_signature=sign_key is not None)
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(f"could not write --out {str(out)!r} ({exc.strerror or type(exc).__name__})") from None
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    return written


def calibrate_main(args) -> int:
    """Entry point of ``cxr-edge calibrate`` (called by :mod:`cxr_edge.cli`)."""
    from . import __version__
    from .cli_support import EXIT_INPUT_FAILED, EXIT_OK, Reporter, UsageError, classifier_options, walk_inputs
    from .signature import load_private_key
    from .engine import Engine, dumps, error_object, skipped_object
    from .operating_points import bootstrap_operating_point, choose_thresholds, parse_rule

    method, target = parse_rule(args.rule)
    if args.min_positive_patients < 1:
        raise UsageError("--min-positive-patients must be >= 1")
    if args.n_boot < 100:
        raise UsageError("--n-boot must be >= 100 (the AUC interval decides undetermined labels)")
    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise UsageError("--out must name a .onnx file")
    if out.exists() and not args.force:
        raise UsageError(f"--out {str(out)!r} exists; pass --force to overwrite it")
    sign_key = load_private_key(args.sign_key) if getattr(args, "sign_key", None) else None  # fail before the run
    engine = Engine(args.model, threads=args.threads, **classifier_options(args))
    src_path = Path(engine.classifier.bundle.path)
    if out.exists() and out.resolve() == src_path.resolve():
        raise UsageError("--out must not be the bundle being recalibrated")
    manifest = engine.manifest
    labels = list(manifest.labels)
    table = read_labels_csv(args.labels, labels)
    rep = Reporter(args.json)
    if table.ignored_columns:
        print(f"cxr-edge calibrate: note: columns matching no label of this bundle are ignored: "
              f"{', '.join(table.ignored_columns)}", file=sys.stderr)
    if not table.matched_columns:
        raise InvalidArgumentError(f"--labels has no column for any label of this bundle ({', '.join(labels)})")

    paths: list[str] = []
    by_name: dict[str, str] = {}
    failed = skipped = 0
    for path, reason in walk_inputs(args.paths):
        if reason is not None:
            skipped += 1
            rep.skipped(skipped_object(path, reason))
            continue
        name = Path(path).name
        if name in by_name:
            raise InvalidArgumentError(f"two input images share the file name {name!r}; labels.csv names images by "
                                       "file name, so they must be unique")
        by_name[name] = path
        if name in table.rows:
            paths.append(path)
        else:
            skipped += 1
            rep.skipped(skipped_object(path, "no row in --labels for this file name"))
    unmatched_rows = sum(1 for name in table.rows if name not in by_name)
    if not paths:
        raise InvalidArgumentError("no input image has a row in --labels (rows are matched by file name)")

    probs, targets, pids = [], [], []
    for path, obj in zip(paths, engine.run(paths, batch_size=args.batch_size)):
        if not obj["ok"]:
            failed += 1
            rep.error(obj)
            continue
        pid, t = table.rows[Path(path).name]
        probs.append([obj["probabilities"][n] for n in labels])
        targets.append(t)
        pids.append(pid)
    if not probs:
        rep.error(error_object("<inputs>", InvalidArgumentError("no labelled image could be classified")))
        return EXIT_INPUT_FAILED
    P = np.asarray(probs, dtype=np.float64)
    P_prev = P.astype(np.float32)  # what the previous thresholds saw
    T = np.stack(targets).astype(np.float32)
    model_bytes = src_path.read_bytes()
    temp_details = None
    if args.temperature:
        from .temperature import apply_temperatures, fit_temperatures

        clipped = np.clip(P, 1e-12, 1 - 1e-12)
        logits = np.log(clipped) - np.log1p(-clipped)  # the bundle's (already tempered) logits, from float64 outputs
        temps, temp_details = fit_temperatures(logits, T, labels)
        P = 1.0 / (1.0 + np.exp(-logits / np.asarray(temps)))
        model_bytes, manifest = apply_temperatures(model_bytes, manifest, temps, temp_details)
    P = P.astype(np.float32)
    new, details = choose_thresholds(P, T, labels, method=method, target=target, patient_ids=pids,
                                     min_positive_patients=args.min_positive_patients, n_boot=args.n_boot,
                                     seed=args.seed)
    pid_arr = np.asarray(pids)
    for j, name in enumerate(labels):
        entry = details["per_label"][name]
        known = np.isfinite(T[:, j])
        if new[j] is not None:
            entry["at_new_threshold"] = bootstrap_operating_point(T[known, j], P[known, j], new[j], pid_arr[known],
                                                                  n_boot=args.n_boot, seed=args.seed)
        old = manifest.thresholds[j]
        if old is not None and known.any() and 0 < T[known, j].sum() < known.sum():
            entry["at_previous_threshold"] = bootstrap_operating_point(T[known, j], P_prev[known, j], old, pid_arr[known],
                                                                       n_boot=args.n_boot, seed=args.seed)
        entry["previous_threshold"] = old
    recal = {
        "tool": f"cxr-edge calibrate {__version__}",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rule": args.rule, "method": method, "target": target if method in ("specificity", "sensitivity") else None,
        "images": int(len(P)), "patients": int(len(set(pids))), "patient_ids_given": table.has_patient_ids,
        "min_positive_patients": args.min_positive_patients, "n_boot": args.n_boot, "seed": args.seed,
        "labels_file_sha256": table.sha256, "labels_without_column": table.missing_labels,
        "previous_model_id": manifest.model_id,
        "previous_thresholds": list(engine.manifest.thresholds),
        "temperature": temp_details,
        "caveat": "operating points are measured on the images the thresholds were fitted on (optimistic)",
        "details": details,
    }
    provenance = dict(manifest.provenance)
    provenance["recalibration"] = recal
    new_manifest = dataclasses.replace(manifest, thresholds=tuple(new), provenance=provenance,
                                       model_id=args.model_id or manifest.model_id)
    written = write_verified_bundle(model_bytes, new_manifest, out, sign_key=sign_key)
    source_signature = engine.classifier.signature
    dropped = source_signature.signed and sign_key is None
    if dropped:
        print(f"cxr-edge calibrate: note: the source bundle was signed (key {source_signature.key_fingerprint[:16]}...); "
              "that signature covered the old thresholds and was dropped, so the new bundle is unsigned: sign it with "
              f"python -m export.sign {out} --key PRIVATE.pem (or rerun with --sign-key)", file=sys.stderr)
    summary = {"schema_version": SCHEMA_VERSION, "ok": True, "op": "calibrate", "out": str(out), "model_id": new_manifest.model_id,
               "rule": args.rule, "images": int(len(P)), "patients": int(len(set(pids))), "failed": failed,
               "skipped": skipped, "label_rows_without_image": unmatched_rows,
               "thresholds": dict(zip(labels, new)), "previous_thresholds": dict(zip(labels, manifest.thresholds)),
               "per_label": details["per_label"], "caveat": recal["caveat"],
               "temperature": None if temp_details is None else {
                   "temperatures": manifest.provenance["temperature"]["temperatures"],
                   "mean_ece_before": temp_details["mean_ece_before"], "mean_ece_after": temp_details["mean_ece_after"]},
               "signature": written.signature.to_dict(), "source_signature_dropped": dropped}
    if args.json:
        print(dumps(summary), flush=True)
    else:
        print(f"recalibrated {manifest.model_id} on {len(P)} images ({len(set(pids))} patients), rule {args.rule}; "
              f"undetermined if < {args.min_positive_patients} positive patients or AUC 95% CI includes 0.5")
        print(report_table(labels, manifest.thresholds, new, details["per_label"]))
        print(f"(95% patient-bootstrap intervals, {args.n_boot} resamples; {recal['caveat']})")
        if temp_details is not None:
            print("temperature per label: " + ", ".join(f"{n} {e['temperature']:.2f}"
                                                        for n, e in temp_details["per_label"].items())
                  + f"; mean ECE on these images {temp_details['mean_ece_before']:.3f} -> "
                    f"{temp_details['mean_ece_after']:.3f} (optimistic: the fitting images)")
        signed = f"; signed, key {written.signature.key_fingerprint[:16]}..." if written.signature.signed else "; unsigned"
        print(f"wrote {out} (model_id {new_manifest.model_id}{signed}); {failed} image(s) failed, {skipped} skipped, "
              f"{unmatched_rows} label row(s) without an image; {manifest.notice}", file=sys.stderr)
    return EXIT_INPUT_FAILED if failed else EXIT_OK
