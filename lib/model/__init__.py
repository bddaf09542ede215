"""Flax Linen classifiers, their normalizations and initializers. Imports only lib.core.
"""
