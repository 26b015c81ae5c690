"""sglang.test: the shim's test helpers.

`sglang.test.test_utils` is served from compat_utils.py: no file here is named test_*.py, so that pytest
never mistakes the shim for tests.
"""

import sys

from sglang.test import compat_utils as _compat_utils

sys.modules[__name__ + ".test_utils"] = _compat_utils
test_utils = _compat_utils
