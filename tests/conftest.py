"""Test-wide settings: hypothesis draws the same examples on every run and machine.

CI must not be flaky: the profile ``ddiscan`` (the default) is derandomized and keeps no
example database, so a run's outcome depends only on the code. ``HYPOTHESIS_PROFILE=random``
draws fresh examples (a failure then prints the seed to reproduce it).
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ddiscan", derandomize=True, database=None, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("random", derandomize=False, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ddiscan"))
