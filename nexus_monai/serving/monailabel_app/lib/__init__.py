"""MONAI Label app library (tasks of the nexus_monai app)."""
