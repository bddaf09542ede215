"""One run on disk and in time: its directory, lock, checkpoints, metrics, provenance, the run
book that keeps them, the training loop, evaluation of a finished run (or an ensemble of
runs), and the fault points
and kill -9 loop that test all of it. Imports the packages below it.
"""
