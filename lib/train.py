"""One-release alias of `lib.train` (now lib/runs/train.py), for scripts written as
`from lib.train import train_and_evaluate`. This module goes in the next release.
"""
from lib.runs.train import Preempted, train_and_evaluate  # noqa: F401
