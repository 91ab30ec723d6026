"""networks: encoders, implicit decoders, positional encoding, Nexus-INR, TransUNet."""

from nexus_monai.networks.attention import LocalWindowCrossAttention
from nexus_monai.networks.decoders import MLPDecoder, SIRENDecoder, build_decoder
from nexus_monai.networks.encoders import RDN, ResCNN, SRResNet, build_encoder
from nexus_monai.networks.nexus_inr import NexusINR, lookup
from nexus_monai.networks.positional import FourierFeatures
from nexus_monai.networks.transunet import TransUNet

__all__ = [
    "LocalWindowCrossAttention",
    "MLPDecoder",
    "SIRENDecoder",
    "build_decoder",
    "RDN",
    "ResCNN",
    "SRResNet",
    "build_encoder",
    "NexusINR",
    "lookup",
    "FourierFeatures",
    "TransUNet",
]
