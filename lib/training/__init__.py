"""What one compiled step computes, and how configs become programs: config resolution, the
objective (augmentations, regularizers, losses), the optimizer, the train state and steps,
the engines that compile a config (or many arms) on a mesh, and which runs share a program.
Imports lib.core, lib.data, lib.model.
"""
