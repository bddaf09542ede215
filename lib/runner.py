"""One-release alias of the sweep runner's old home (lib/sweeps/ now). SLURM tasks
pickled before the move name `lib.runner.ArrayTask`: a job queued or requeued
across the update still unpickles. This module goes in the next release.
"""
from lib.sweeps.runner import *  # noqa: F401,F403
from lib.sweeps.runner import ArrayTask, execute, plan, run_group, run_task  # noqa: F401
from lib.sweeps.task import _run_job  # noqa: F401
