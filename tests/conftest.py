from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI replays the same examples every run (a red CI blocks everything, so no surprise seeds there);
# ELDR_HYPOTHESIS_EXPLORE=1 draws fresh ones, with ELDR_HYPOTHESIS_EXAMPLES for how many.
settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("ELDR_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    derandomize=os.environ.get("ELDR_HYPOTHESIS_EXPLORE") != "1",
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")
