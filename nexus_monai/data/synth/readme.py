"""The dataset README text: what is simulated, from which sources under which licences, and every
randomised range (read from the stage modules' range tables, so the text cannot drift)."""

from __future__ import annotations

from nexus_monai import __version__ as _PACKAGE_VERSION
from nexus_monai.data.synth.anatomy import RANGES as ANATOMY_RANGES
from nexus_monai.data.synth.grid import SIZES
from nexus_monai.data.synth.lesions import LESION_RANGES
from nexus_monai.data.synth.physics import (
    ACQUISITION_RANGES,
    LR_ACQUISITION_RANGES,
    SEQUENCE_RANGES,
    T1_RATIO_15T,
    T2_RATIO_15T,
    TISSUE_PROPERTIES,
)
from nexus_monai.data.synth.sources import SOURCE_TEXT, TEST_ONLY_SOURCE, TRAINING_SOURCES
from nexus_monai.keys import LESION_BOTH, LESION_T1_ONLY, LESION_T2_ONLY

__all__ = ["README_FIRST_LINE", "readme_text"]

README_FIRST_LINE = "nexus_monai SYNTHETIC BraTS-format dataset (SIMULATED from public templates, not patient data)"

_TUMOUR_RANGES = [
    "tumour (every subject): oedema radius 15-34 mm, core 0.4-0.7 x oedema (>= 8 mm), necrosis 0.5-0.8 x core",
    "  (>= 3 mm), boundary irregularity 0.12-0.35, white-matter affinity 0.3-0.7, oedema edge 3-8 mm, fingers",
    "  0.08-0.18, oedema grading 0.2-0.45, texture 4-10 %, mass effect 10-35 %; centre in WM >= 15 mm deep",
]


def _fmt(key: str, value) -> str:
    """One range for the README: ``a to b`` (uniform), ``one of ...`` (a choice), ``+-x`` / ``x f``."""
    if key in ("field_T", "slice_profile"):
        return "one of " + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + " (equal odds)"
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{value[0]:g} to {value[1]:g}"
    if isinstance(value, (tuple, list)):
        return "+-(" + ", ".join(f"{v:g}" for v in value) + ")"
    return f"x {value:g}" if key.endswith("factor") else f"+-{value:g}"


def readme_text(generator: str, subjects: int, seed: int, size: str, split: dict[str, list[int]]) -> str:
    shape, spacing = SIZES[size]
    lines = [
        README_FIRST_LINE,
        "",
        "These images are SIMULATED. They are NOT patient data and carry no clinical information.",
        "",
        f"generator: {generator} (nexus_monai {_PACKAGE_VERSION})",
        f"seed: {seed}",
        f"size: {size} ({shape[0]}x{shape[1]}x{shape[2]} voxels, {spacing:g} mm isotropic, RAS diagonal affine)",
        f"subjects: {subjects} (training {len(split['training'])}, validation {len(split['validation'])}, "
        f"test {len(split['test'])}) + test_anatomy {len(split['test_anatomy'])}; datalist: dataset.json",
        "",
        "Anatomy sources (read offline from installed Python wheels):",
    ]
    for name in (*TRAINING_SOURCES, TEST_ONLY_SOURCE):
        lines.append(f"  {name}: {SOURCE_TEXT[name]}")
    lines += [
        f"  training/validation/test subjects alternate {' / '.join(TRAINING_SOURCES)} (odd / even index);",
        f"  test_anatomy subjects (SynBraTSTA_NNNN) all use {TEST_ONLY_SOURCE}: a TEST-ONLY anatomy family, never",
        "  in training or validation (model selection); evaluate with --split test_anatomy.",
        "  Tissue maps from a T1w only: 3-class Gaussian mixture on the masked T1w, soft posteriors as",
        "  CSF/GM/WM fractions (classes sorted by mean intensity).",
        "  validation/test subjects use held-out warp ranges (marked held_out); test_anatomy uses training ranges.",
        "",
        "Anatomy ranges (uniform per subject; mm, degrees, fractions):",
    ]
    lines += [f"  {k}: {_fmt(k, v)}" for k, v in ANATOMY_RANGES.items()]
    lines += ["  head_scale is further multiplied by (1.88 L / source brain volume)^(1/3)", ""]
    lines += _TUMOUR_RANGES + ["",
                               "Contrast-specific white-matter lesions (every subject; instance map "
                               "<ID>_lesions.nii.gz,",
                               "value = class * 1000 + n; class 1 = T2w/FLAIR only, 2 = T1w only, 3 = both):"]
    names = {LESION_T2_ONLY: "T2-only (1)", LESION_T1_ONLY: "T1-only (2)", LESION_BOTH: "both / PVS (3)"}
    for klass, ranges in LESION_RANGES.items():
        lines.append(f"  {names[klass]}: " + "; ".join(f"{k} {_fmt(k, v)}" for k, v in ranges.items()))
    lines += [
        "  invisible contrast: PD solved so the lesion's signal equals white matter's exactly (same parameters",
        "  as the normal tissue it replaces); lesions sit in WM (source WM probability >= 0.9), never touch.",
        "",
        "Physics (3 T nominal values; at 1.5 T T1 x ratio, T2 x ratio, see below):",
        f"  {'compartment':<12} {'T1 ms':>7} {'T2 ms':>7} {'PD':>5}  Gd mM (T1ce)  T1/T2 ratio 1.5T",
    ]
    for name, t in TISSUE_PROPERTIES.items():
        gd = f"{t.gd_mM[0]:g}" if t.gd_mM[0] == t.gd_mM[1] else f"{t.gd_mM[0]:g}-{t.gd_mM[1]:g}"
        lines.append(f"  {name:<12} {t.t1_ms:>7g} {t.t2_ms:>7g} {t.pd:>5.2f}  {gd:<12}  "
                     f"{T1_RATIO_15T[name]:g}/{T2_RATIO_15T[name]:g}")
    lines += [
        "  spin echo (T1w, T1ce, T2w): S = PD (1 - exp(-TR/T1)) exp(-TE/T2)",
        "  FLAIR inversion recovery:   S = |PD (1 - 2 exp(-TI/T1) + exp(-TR/T1)) exp(-TE/T2)|, TI = CSF null x factor",
        "  gadolinium: 1/T1 = 1/T1_0 + r1 C, 1/T2 = 1/T2_0 + r2 C, r1 = 4.0, r2 = 5.0 /mM/s",
        "  partial volume: voxel signal = sum of fraction x compartment signal",
        "Sequence ranges (ms; T1ce uses the T1w timings):",
    ]
    for field_t, seqs in SEQUENCE_RANGES.items():
        lines.append(
            f"  {field_t:g} T: "
            + "; ".join(f"{m} " + " ".join(f"{p} {_fmt(p, v)}" for p, v in s.items()) for m, s in seqs.items())
        )
    lines.append("Acquisition / scanner ranges:")
    lines += [f"  {k}: {_fmt(k, v)}" for k, v in ACQUISITION_RANGES.items()]
    lines += [
        "Thick-slice (LR) acquisition, drawn per scan and written to the datalist entry (<contrast>_slice_profile,",
        "  _thickness_ratio, _slab_offset, _lr_noise, _noise_seed); the protocol YAMLs pass them to the acquisition:",
    ]
    lines += [f"  {k}: {_fmt(k, v)}" for k, v in LR_ACQUISITION_RANGES.items()]
    lines += [
        "  LR scans are simulated from the noise-free render <ID>_<contrast>_clean.nii.gz (bias field included),",
        "  their Rician noise (sigma = lr_noise x the LR brain 99.5th percentile) added to the LR scan only.",
        "  0 outside the (randomised) brain mask; extra voxels of a dilated mask are extra-cerebral CSF.",
        "labels: 0 background, 1 necrotic core, 2 peritumoral oedema, 4 enhancing tumour (BraTS 2020)",
        "files: <ID>/<ID>_{t1,t1ce,t2,flair,seg,lesions}.nii.gz, <ID>_{t1,t1ce,t2,flair}_clean.nii.gz (noise-free),",
        "       <ID>_params.json (the drawn parameters);",
        "       montage.png shows subject 1.",
        "Sources: Wansapura et al. JMRI 1999 (WM/GM T1, T2 at 3 T); Rooney et al. MRM 2007 (T1 field dependence);",
        "CSF ~ free water; tumour and lesion values are representative approximations, not measurements.",
        "See the nexus_monai.data.synth package docstrings.",
        "",
    ]
    return "\n".join(lines)
