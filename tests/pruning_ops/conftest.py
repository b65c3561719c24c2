"""Keep Hypothesis' files (constants cache, failure patches; the example database is off in the tests)
out of the checkout: they go to one fixed directory under the system temp dir."""

from __future__ import annotations

import os
import tempfile

try:
    from hypothesis import configuration
except ImportError:  # the property tests import hypothesis themselves and fail loudly if it is missing
    configuration = None

if configuration is not None:
    configuration.set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "prunert-hypothesis"))
