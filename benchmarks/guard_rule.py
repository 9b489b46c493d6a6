"""The accuracy guard's decision, written down before its cells finished (docs/RESULTS.md, "The accuracy guard").

    python benchmarks/guard_rule.py PAIR STEPS BASELINE CANDIDATE     # prints the mode to use

The candidate mode (bf16 channels-last) replaces float32 as the CPU default when, for each of BN, MN
and UAN, the 95 % confidence interval of the mean paired difference of target accuracy (candidate −
baseline, by seed; Student's t with n − 1 degrees of freedom) contains 0, and the mean difference is
not below −0.5 points; otherwise the baseline stays. It reads the guard's summary
(``da_table.py --guard``), so it chooses from the paired numbers alone.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from scipy import stats

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("bn", "mn", "uan")
FLOOR = -0.005  # −0.5 points


def within_noise(differences: list[float]) -> bool:
    """Whether the paired differences are compatible with none (module docstring)."""
    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return False
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean - half <= 0 <= mean + half and mean >= FLOOR


def main() -> None:
    pair, steps, baseline, candidate = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    rows = json.loads((RESULTS / f"da_guard_{pair}-{steps}steps.json").read_text())
    verdicts = {row: within_noise(rows[row]["difference"]["values"]) if row in rows else False for row in ROWS}
    print(candidate if all(verdicts.values()) else baseline)
    print({row: ("within noise" if ok else "not within noise") for row, ok in verdicts.items()}, file=sys.stderr)


if __name__ == "__main__":
    main()
