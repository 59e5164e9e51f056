"""One way every benchmark reports: a two-column table on stdout and the same facts as JSON."""

from __future__ import annotations

import json


def emit(report: dict, out: str | None) -> None:
    print("\n| what | value |\n| --- | --- |")
    for key, value in report.items():
        print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
