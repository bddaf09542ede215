"""The tuning recipe's checks, learning-curve diagnoses and the benchmark. Imports the
packages below it.
"""
