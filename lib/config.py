"""One-release alias of the config's old home, for experiment modules written
against it (`from lib.config import base_config`). The keys and defaults are in
lib/core/config.py, validation in lib/training/resolve.py: import from there.
This module goes in the next release.
"""
from lib.core.config import (NON_SEMANTIC_KEYS, WATCH_KEYS, base_config, diff, flatten,  # noqa: F401
                             from_json_dict, from_resolved_json_dict, is_resolved, to_json_dict)
from lib.training.resolve import VECTORIZE_MODES, resolve  # noqa: F401
