"""The ground floor: errors, registries, the factor table, the config keys, the device mesh and the
entry-point plumbing. Imports nothing else of lib.
"""
