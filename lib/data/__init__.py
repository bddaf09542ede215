"""Datasets: the sources (digits, cifar_dir, npz, tfds), the train/val split and
normalization statistics (datasets.py); the splits resident on the device mesh
and the order training reads them (device.py). Imports only lib.core.
"""
