"""Infer tasks of the nexus_monai MONAI Label app.

Import ``lib.infers.nexus_sr`` (needs monailabel) or ``lib.infers.sr_request`` (plain Python)
directly; this package imports neither so the plain part works without monailabel.
"""
