"""Re-derive every table from the results JSON alone: the protocol's metrics and bootstrap
intervals are recomputed from each file's ``raw`` per-(data seed, model seed, sequence) errors
with the bootstrap seed and resample count the file records, and printed as markdown.

    python examples/rederive.py docs/results/*.json              # the tables, recomputed
    python examples/rederive.py --check docs/results/*.json      # exit 1 on any mismatch
    python examples/rederive.py --write-docs docs/*.md -- docs/results/*.json

``--check`` compares every recomputed figure with the one stored in the JSON, exactly (the JSON
text of both); a protocol report without ``raw`` cannot be re-derived and fails the check.
``--write-docs PAGE...`` rewrites, in each page, every block between ``<!-- table:NAME -->`` and
``<!-- /table -->`` with the table of the JSON whose file name is ``NAME.json``, so that the docs'
tables are generated, never typed. Files that are not protocol reports (no ``rows``) are skipped.
An example's extra columns (drift, SSIM, ...) are the example's own figures, copied from the JSON;
only the protocol's columns are recomputed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402

#: Extra table columns per example: ``(key, header, format)`` as the examples print them.
EXTRA_COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "pendulum": [
        ("ratio_in_range", "in-range", ".3f"),
        ("ratio_out_of_range", "out-range", ".3f"),
        ("energy_drift", "H drift", ".3f"),
    ],
    "spring": [
        ("ratio_in_range", "in-range", ".3f"),
        ("ratio_out_of_range", "out-range", ".3f"),
        ("energy_drift", "H drift", ".3f"),
    ],
    "ising": [
        ("m_drift", "M drift", ".4f"),
        ("m_drift_final", "M drift@T", ".4f"),
        ("energy_error", "E error", ".4f"),
    ],
    "video": [("mse_last", "last MSE", ".5f"), ("ssim", "SSIM", ".3f")],
    "real_pendulum": [
        ("whole_ratio", "whole", ".3f"),
        ("validation_error", "val MSE", ".3g"),
        ("energy_change", "ΔE / window", "+.3f"),
        ("cost_ratio", "cost", ".0f"),
    ],
}
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def is_report(report: Any) -> bool:
    """A protocol report (an example's results), not some other JSON."""
    return isinstance(report, Mapping) and isinstance(report.get("rows"), Mapping)


def rederive_rows(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The protocol's figures (``protocol.DERIVED_KEYS``) of every row, recomputed from ``raw``
    with the JSON's bootstrap settings, as the JSON writes them (non-finite as null)."""
    raw = report.get("raw")
    if not raw:
        raise ValueError("no raw errors in the JSON: re-run the example to re-derive it")
    settings = report.get("protocol", {})
    errors = {row: np.asarray(values, dtype=np.float64) for row, values in raw.items()}
    rows = protocol.row_metrics(
        errors,
        vanilla=settings.get("vanilla", "vanilla"),
        control=settings.get("control", "control"),
        seed=settings.get("bootstrap_seed", protocol.BOOTSTRAP_SEED),
        resamples=settings.get("resamples", protocol.BOOTSTRAP_RESAMPLES),
    )
    derived = {name: {k: m[k] for k in protocol.DERIVED_KEYS if k in m} for name, m in rows.items()}
    parsed: dict[str, dict[str, Any]] = json.loads(protocol.json_text(derived))
    return parsed


def mismatches(report: Mapping[str, Any]) -> list[str]:
    """Every recomputed figure that differs from the stored one (as JSON text), and every row
    of the report that ``raw`` lacks or the other way round."""
    try:
        derived = rederive_rows(report)
    except ValueError as exc:
        return [str(exc)]
    stored = report["rows"]
    out = [f"row {name}: in raw, not in rows" for name in derived if name not in stored]
    out += [f"row {name}: in rows, not in raw" for name in stored if name not in derived]
    for name, metrics in derived.items():
        if name not in stored:
            continue
        for key, value in metrics.items():
            if json.dumps(stored[name].get(key)) != json.dumps(value):
                out.append(f"row {name} {key}: stored {stored[name].get(key)!r}, got {value!r}")
    return out


def rederived_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report with every row's protocol figures replaced by the recomputed ones (the
    example's extras, the step and the selection kept as stored)."""
    derived = rederive_rows(report)
    rows = {name: {**report["rows"].get(name, {}), **m} for name, m in derived.items()}
    return {**report, "rows": rows}


def table(report: Mapping[str, Any]) -> str:
    """The markdown table of a report, recomputed from ``raw``."""
    extra = EXTRA_COLUMNS.get(str(report.get("example")), [])
    return protocol.markdown_table(rederived_report(report), extra)


def write_docs(pages: Sequence[Path], reports: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    """Rewrite every ``<!-- table:NAME -->`` ... ``<!-- /table -->`` block of ``pages`` with
    the recomputed table of ``reports[NAME]`` (the JSON's file stem); returns the pages changed.
    A block naming a report that is not given is an error."""
    changed = []
    for page in pages:
        text = page.read_text()

        def fill(match: re.Match[str], page: Path = page) -> str:
            name = match.group("name")
            if name not in reports:
                raise KeyError(f"{page}: a table block names {name}, no {name}.json given")
            return f"{match.group(1)}{table(reports[name])}\n{match.group(4)}"

        new = BLOCK.sub(fill, text)
        if new != text:
            page.write_text(new)
            changed.append(page)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", type=Path, help="results JSON files")
    parser.add_argument("--check", action="store_true", help="exit 1 if a figure differs")
    parser.add_argument(
        "--write-docs", nargs="+", type=Path, default=None, metavar="PAGE", help="docs pages"
    )
    args = parser.parse_args(argv)
    reports: dict[str, dict[str, Any]] = {}
    failed = False
    for path in args.files:
        report = json.loads(path.read_text())
        if not is_report(report):
            print(f"{path}: not a protocol report, skipped", file=sys.stderr)
            continue
        if args.check:
            bad = mismatches(report)
            print(f"{path}: {'OK' if not bad else f'{len(bad)} mismatches'}")
            for line in bad[:20]:
                print(f"  {line}")
            failed |= bool(bad)
            if bad:
                continue
        elif not report.get("raw"):
            print(f"{path}: no raw errors, cannot re-derive (re-run the example)", file=sys.stderr)
            failed = True
            continue
        reports[path.stem] = report
        if not args.check and args.write_docs is None:
            print(f"\n## {path.name}: {report.get('example')}, {report.get('metric')}\n")
            print(table(report))
    if args.write_docs is not None:
        for page in write_docs(args.write_docs, reports):
            print(f"rewrote {page}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
