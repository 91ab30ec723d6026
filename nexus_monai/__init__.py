"""nexus_monai: MONAI-native arbitrary-scale multi-contrast brain-MRI super-resolution with INRs."""

__version__ = "0.1.0"
