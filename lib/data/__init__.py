"""Datasets: the sources (digits, cifar_dir, npz, tfds), the train/val split and normalization
statistics. Imports only lib.core.
"""
