"""MR physics of the simulation: relaxation tables at 1.5 T and 3 T, sequences, scanner artefacts.

Every voxel signal is the partial-volume sum over compartments ``k`` of fraction ``f_k`` times
the compartment signal, computed from its proton density PD, T1 and T2 (ms) by

* T1w, T1ce, T2w spin echo (TE << TR): ``S = PD (1 - exp(-TR/T1)) exp(-TE/T2)``,
* FLAIR inversion recovery (magnitude of the signed partial-volume sum):
  ``S = PD (1 - 2 exp(-TI/T1) + exp(-TR/T1)) exp(-TE/T2)``,
* gadolinium for T1ce: ``1/T1 = 1/T1_0 + r1 C``, ``1/T2 = 1/T2_0 + r2 C`` with
  r1 = 4.0 and r2 = 5.0 L mmol^-1 s^-1 (order of clinical agents at 3 T, Rohrer et al.,
  Invest Radiol 2005;40:715) and tissue concentration C (mM) per compartment.

Relaxation parameters at 3 T (nominal values):

===================  =======  =======  =====  ==================
compartment          T1 (ms)  T2 (ms)  PD     Gd C (mM), T1ce
===================  =======  =======  =====  ==================
white matter           832       80    0.69   0.01 (blood pool)
grey matter           1331      110    0.80   0.02 (blood pool)
CSF                   4000     2000    1.00   0
oedema (2)            1700      210    0.86   0.00-0.03 (leakage)
necrosis (1)          2600      330    0.94   0
enhancing tumour (4)  1600      130    0.84   0.10-0.30
===================  =======  =======  =====  ==================

Sources: WM/GM T1 and T2 from Wansapura et al., J Magn Reson Imaging 1999;9:531-538 (3 T);
CSF taken as nearly free water (T1 ~ 4 s, e.g. Rooney et al., Magn Reson Med 2007;57:308-318;
T2 ~ 2 s); PD as relative water content (WM ~0.69, GM ~0.80, e.g. Neeb et al., NeuroImage 2006).
Lesion values are representative approximations chosen inside the ranges reported by
quantitative glioma MRI (oedema and necrosis: long T1/T2, raised water content; enhancing
tumour: Gd shortening T1 by several hundred ms, e.g. a pre-minus-post T1 difference of ~840 ms
in enhancing glioblastoma, Müller et al., Cancer Med 2020) — they are not measurements.

Field strength (per subject, 1.5 T or 3 T with probability 1/2). At 1.5 T every T1 is the 3 T
value times ``T1_RATIO_15T`` (WM 0.78, GM 0.76: tissue T1 shortens towards lower field, roughly
as measured by Rooney et al. 2007; CSF 1.0, free water is nearly field-independent; tumour
compartments 0.85-0.90, water-rich) and every T2 times 1.05 (CSF 1.0): T2 depends weakly on field.
These ratios are approximations, not measurements. Each subject then jitters T1 and T2 by
U(0.9, 1.1) for normal tissue and U(0.85, 1.15) for tumour compartments, PD by U(0.95, 1.05).

Sequences (per subject, uniform in the range of its field strength; ms), see ``SEQUENCE_RANGES``.
FLAIR TI = the CSF null time ``T1 ln(2 / (1 + exp(-TR/T1)))`` for the nominal CSF T1, times
U(0.95, 1.05).

Acquisition artefacts (``ACQUISITION_RANGES``): a smooth multiplicative bias field ``exp(b)``,
``b`` of 3-20 % standard deviation and 60-120 mm grain, shared by the four scans (weight 0.8)
plus a per-scan part (0.6); Rician noise ``|S + sigma (n1 + i n2)|`` with sigma 1-5 % of the
white-matter signal at 1.5 T and 0.5-3.5 % at 3 T in the HR (BraTS-like) scans; a per-scan gain
1000 x U(0.7, 1.3) (arbitrary scanner units). The noise-free render (bias field included) is kept beside.

Thick-slice acquisition of each scan (``LR_ACQUISITION_RANGES``, drawn by :func:`draw_lr_acquisition`
from its own stream, so the subject itself does not change with it): a slice profile family
(Gaussian or boxcar, equal odds), a slice thickness / slice spacing ratio U(0.7, 1.3) (below 1: a
slice gap), a slab offset U(-0.5, 0.5) HR voxels off the HR grid (a scanner records it in the slice
positions, so the LR affine carries it), Rician noise of U(0, 0.03) x the LR scan's brain 99.5th
percentile added to the LR scan only (simulated from the noise-free render), and a noise seed. They
are written to the datalist entry for the acquisition transforms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nexus_monai.data.synth.grid import FOV_MM, SmoothField

__all__ = [
    "MODALITIES",
    "Tissue",
    "TISSUE_PROPERTIES",
    "T1_RATIO_15T",
    "T2_RATIO_15T",
    "SEQUENCE_RANGES",
    "ACQUISITION_RANGES",
    "Physics",
    "Acquisition",
    "draw_physics",
    "draw_acquisition",
    "LR_ACQUISITION_RANGES",
    "draw_lr_acquisition",
    "signal",
    "compartment_signal",
]

MODALITIES = ("t1", "t1ce", "t2", "flair")
"""The four BraTS 2020 scans written per subject (plus ``seg``)."""


@dataclass(frozen=True)
class Tissue:
    """Nominal 3 T relaxation parameters of one compartment: T1, T2 in ms, PD relative to water,
    gadolinium concentration ``gd_mM`` range (mM) used for T1ce."""

    t1_ms: float
    t2_ms: float
    pd: float
    gd_mM: tuple[float, float]


TISSUE_PROPERTIES: dict[str, Tissue] = {
    "wm": Tissue(832.0, 80.0, 0.69, (0.01, 0.01)),
    "gm": Tissue(1331.0, 110.0, 0.80, (0.02, 0.02)),
    "csf": Tissue(4000.0, 2000.0, 1.00, (0.0, 0.0)),
    "oedema": Tissue(1700.0, 210.0, 0.86, (0.0, 0.03)),
    "necrosis": Tissue(2600.0, 330.0, 0.94, (0.0, 0.0)),
    "enhancing": Tissue(1600.0, 130.0, 0.84, (0.10, 0.30)),
}
"""Compartment table at 3 T (see the module docstring for sources). Keys are the compartment names."""

T1_RATIO_15T = {"wm": 0.78, "gm": 0.76, "csf": 1.0, "oedema": 0.85, "necrosis": 0.90, "enhancing": 0.85}
T2_RATIO_15T = {"wm": 1.05, "gm": 1.05, "csf": 1.0, "oedema": 1.05, "necrosis": 1.05, "enhancing": 1.05}
_TUMOUR = ("oedema", "necrosis", "enhancing")
_GD_R1_PER_MM_MS = 4.0e-3  # 4.0 L/mmol/s  = 4.0e-3 per mM per ms
_GD_R2_PER_MM_MS = 5.0e-3

SEQUENCE_RANGES = {
    1.5: {"t1": {"TR": (400.0, 600.0), "TE": (8.0, 15.0)}, "t2": {"TR": (3000.0, 5000.0), "TE": (80.0, 110.0)},
          "flair": {"TR": (8000.0, 10000.0), "TE": (100.0, 140.0)}},
    3.0: {"t1": {"TR": (500.0, 800.0), "TE": (8.0, 15.0)}, "t2": {"TR": (4000.0, 7000.0), "TE": (80.0, 120.0)},
          "flair": {"TR": (9000.0, 11000.0), "TE": (100.0, 140.0)}},
}
"""Sequence timing ranges (ms) per field strength (T); T1ce uses the T1w timings."""

ACQUISITION_RANGES = {
    "field_T": (1.5, 3.0),
    "relaxation_jitter_normal": (0.9, 1.1),
    "relaxation_jitter_tumour": (0.85, 1.15),
    "pd_jitter": (0.95, 1.05),
    "flair_ti_factor": (0.95, 1.05),
    "gain": (700.0, 1300.0),
    "noise_sigma_of_wm_15T": (0.01, 0.05),
    "noise_sigma_of_wm_3T": (0.005, 0.035),
    "bias_sd": (0.03, 0.20),
    "bias_grain_mm": (60.0, 120.0),
    "slice_profile": ("gaussian", "boxcar"),
    "fwhm_scale": (0.8, 1.2),
}
"""Every physics / scanner range; the dataset README prints this table. (``slice_profile`` and
``fwhm_scale`` are still drawn, keeping the stream of every later draw; the LR acquisition uses
:data:`LR_ACQUISITION_RANGES` instead since generator 3.0.0.)"""

LR_ACQUISITION_RANGES = {
    "slice_profile": ("gaussian", "boxcar"),
    "thickness_ratio": (0.7, 1.3),
    "slab_offset_voxels": (-0.5, 0.5),
    "lr_noise_of_p995": (0.0, 0.03),
}
"""Per-scan thick-slice acquisition ranges (uniform; the profile an equal-odds choice): profile
family, slice thickness / slice spacing (the profile's FWHM or boxcar width over the slab step; < 1
leaves a gap), slab-centre offset from the HR grid (HR voxels, along the thick axis), LR Rician
noise sigma as a fraction of the LR scan's brain 99.5th percentile."""


@dataclass
class Physics:
    """Field strength, relaxation table of one subject and its sequence timings (ms)."""

    field_T: float
    tissues: dict[str, tuple[float, float, float, float]]  # name -> (T1, T2, PD, Gd mM)
    sequences: dict[str, dict[str, float]]  # modality -> {"TR","TE"[, "TI"]}


@dataclass
class Acquisition:
    """Scanner artefacts and slice profiles of one subject's four scans."""

    gains: dict[str, float]
    noise_level: dict[str, float]  # sigma as a fraction of the WM signal
    bias_sd: float
    bias_grain_mm: float
    bias: SmoothField  # 1 shared + one field per scan
    slice_profile: dict[str, dict]  # modality -> {"profile": str, "fwhm_scale": float}


def draw_physics(rng: np.random.Generator) -> Physics:
    """Field strength, jittered relaxation table and sequence timings (ms) of one subject."""
    r = ACQUISITION_RANGES
    field = float(r["field_T"][int(rng.integers(2))])
    tissues = {}
    for name, nominal in TISSUE_PROPERTIES.items():
        spread = r["relaxation_jitter_tumour"] if name in _TUMOUR else r["relaxation_jitter_normal"]
        t1 = nominal.t1_ms * (T1_RATIO_15T[name] if field == 1.5 else 1.0)
        t2 = nominal.t2_ms * (T2_RATIO_15T[name] if field == 1.5 else 1.0)
        tissues[name] = (
            t1 * rng.uniform(*spread),
            t2 * rng.uniform(*spread),
            nominal.pd * rng.uniform(*r["pd_jitter"]),
            rng.uniform(*nominal.gd_mM),
        )
    ranges = SEQUENCE_RANGES[field]
    timing = {m: {p: rng.uniform(*ranges[m][p]) for p in ("TR", "TE")} for m in ("t1", "t2", "flair")}
    csf_t1 = TISSUE_PROPERTIES["csf"].t1_ms * (T1_RATIO_15T["csf"] if field == 1.5 else 1.0)
    tr = timing["flair"]["TR"]
    timing["flair"]["TI"] = csf_t1 * math.log(2.0 / (1.0 + math.exp(-tr / csf_t1))) * rng.uniform(*r["flair_ti_factor"])
    sequences = {"t1": timing["t1"], "t1ce": dict(timing["t1"]), "t2": timing["t2"], "flair": timing["flair"]}
    return Physics(field, tissues, sequences)


def draw_acquisition(rng: np.random.Generator, field_T: float) -> Acquisition:
    """Gains, noise levels, bias field and slice profiles of one subject's scans."""
    r = ACQUISITION_RANGES
    gains = {m: rng.uniform(*r["gain"]) for m in MODALITIES}
    noise_range = r["noise_sigma_of_wm_15T"] if field_T == 1.5 else r["noise_sigma_of_wm_3T"]
    noise = {m: rng.uniform(*noise_range) for m in MODALITIES}
    bias_sd = rng.uniform(*r["bias_sd"])
    grain = rng.uniform(*r["bias_grain_mm"])
    bias = SmoothField(rng, -FOV_MM / 2, FOV_MM / 2, grain, n_fields=1 + len(MODALITIES))
    profiles = {
        m: {"profile": r["slice_profile"][int(rng.integers(2))], "fwhm_scale": rng.uniform(*r["fwhm_scale"])}
        for m in MODALITIES
    }
    return Acquisition(gains, noise, bias_sd, grain, bias, profiles)


def draw_lr_acquisition(rng: np.random.Generator) -> dict[str, dict]:
    """Per scan (``MODALITIES``): ``{"profile", "thickness_ratio", "slab_offset", "lr_noise", "noise_seed"}``
    drawn from :data:`LR_ACQUISITION_RANGES` (``slab_offset`` in HR voxels, ``noise_seed`` an int < 2**31)."""
    r = LR_ACQUISITION_RANGES
    out = {}
    for m in MODALITIES:
        out[m] = {
            "profile": r["slice_profile"][int(rng.integers(2))],
            "thickness_ratio": float(rng.uniform(*r["thickness_ratio"])),
            "slab_offset": float(rng.uniform(*r["slab_offset_voxels"])),
            "lr_noise": float(rng.uniform(*r["lr_noise_of_p995"])),
            "noise_seed": int(rng.integers(2**31 - 1)),
        }
    return out


def signal(modality: str, sequence: dict, t1: float, t2: float, pd: float, gd: float = 0.0) -> float:
    """Signed signal (PD units) of a pure compartment with ``t1, t2`` (ms), ``pd`` and Gd ``gd``
    (mM, only for ``t1ce``) for one scan of timings ``sequence`` (ms)."""
    if modality == "t1ce" and gd > 0:
        t1 = 1.0 / (1.0 / t1 + _GD_R1_PER_MM_MS * gd)
        t2 = 1.0 / (1.0 / t2 + _GD_R2_PER_MM_MS * gd)
    decay = math.exp(-sequence["TE"] / t2)
    if modality == "flair":
        return pd * (1.0 - 2.0 * math.exp(-sequence["TI"] / t1) + math.exp(-sequence["TR"] / t1)) * decay
    return pd * (1.0 - math.exp(-sequence["TR"] / t1)) * decay


def compartment_signal(modality: str, physics: Physics, name: str) -> float:
    """Signed signal of one pure compartment of the subject's table (PD units) for one scan."""
    return signal(modality, physics.sequences[modality], *physics.tissues[name])
