"""MONAI transforms of nexus_monai (array classes and their dictionary twins)."""

from nexus_monai.transforms.acquisition import (
    PROFILES,
    AcquisitionRicianNoise,
    AcquisitionRicianNoised,
    SimulateAnisotropicAcquisition,
    SimulateAnisotropicAcquisitiond,
    RandSimulateAnisotropicAcquisitiond,
    slice_profile_matrix,
)
from nexus_monai.transforms.frame import PadToFramed, frame_shape
from nexus_monai.transforms.labels import BraTSRegionsToLabels, BraTSRegionsToLabelsd
from nexus_monai.transforms.intensity import (
    INTENSITY_NORMS,
    ScaleByMaskPercentiled,
    ZScoreLikeReferenced,
    intensity_normalizer,
    reference_normalization,
)
from nexus_monai.transforms.lesions import LesionRegion, LesionRegiond, lesion_instances, lesion_region
from nexus_monai.transforms.patches import RandPairedPatchd
from nexus_monai.transforms.query import ComputeWorldNormalizerd, SampleQueryPointsd, iter_query_chunks

__all__ = [
    "PROFILES",
    "AcquisitionRicianNoise",
    "AcquisitionRicianNoised",
    "SimulateAnisotropicAcquisition",
    "SimulateAnisotropicAcquisitiond",
    "RandSimulateAnisotropicAcquisitiond",
    "slice_profile_matrix",
    "BraTSRegionsToLabels",
    "BraTSRegionsToLabelsd",
    "PadToFramed",
    "frame_shape",
    "ScaleByMaskPercentiled",
    "ZScoreLikeReferenced",
    "INTENSITY_NORMS",
    "intensity_normalizer",
    "reference_normalization",
    "LesionRegion",
    "LesionRegiond",
    "lesion_instances",
    "lesion_region",
    "RandPairedPatchd",
    "ComputeWorldNormalizerd",
    "SampleQueryPointsd",
    "iter_query_chunks",
]
