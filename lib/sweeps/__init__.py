"""Many runs: expanding an experiment's get_sweep, executing the runs (locally, in workers,
on SLURM), and the ablation report. Imports the packages below it.
"""
