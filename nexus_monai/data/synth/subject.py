"""One simulated subject: the stages of the generator composed, deterministic per (seed, index).

Per subject ``i`` (1-based) of a run with ``seed``, everything is drawn from
``numpy.random.default_rng([seed, i])`` (test-only anatomy subjects from
``default_rng([seed, i, 1])``), in a fixed order that does not depend on the output size, so a
run is byte-for-byte reproducible (same software stack) and the ``small`` and ``full`` versions
of one subject share their anatomy, tumour, lesions and sequence parameters. The thick-slice
acquisition of each scan (:func:`~.physics.draw_lr_acquisition`) comes from a stream of its own,
``default_rng([seed, i, 2])`` (test-only family ``[seed, i, 1, 2]``), so drawing it changes nothing else.

Stages: anatomy source and warp (:mod:`.anatomy`, :mod:`.sources`), skull-stripping edge and
tissue maps, tumour (:mod:`.tumour`), contrast-specific lesions (:mod:`.lesions`), MR signal
and scanner artefacts (:mod:`.physics`). Outside the (randomised) brain mask the images are
exactly 0 (skull-stripped, as BraTS); inside they are floored at a small positive value so that
``image > 0`` recovers the brain mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nexus_monai.data.synth.anatomy import draw_anatomy, place_brain, sample_source, strip_edge, tissue_maps
from nexus_monai.data.synth.grid import SIZES, grid_axes, output_affine, to_jsonable
from nexus_monai.data.synth.lesions import draw_lesions, lesion_signals, probe_axes, rasterise_lesions
from nexus_monai.data.synth.physics import (
    MODALITIES,
    compartment_signal,
    draw_acquisition,
    draw_lr_acquisition,
    draw_physics,
)
from nexus_monai.data.synth.sources import TEST_ONLY_SOURCE, TRAINING_SOURCES, source_maps
from nexus_monai.data.synth.tumour import (
    TUMOUR_COMPARTMENTS,
    choose_tumour_centre,
    draw_tumour_fields,
    draw_tumour_shape,
    tumour_fractions,
)

__all__ = ["SimulatedSubject", "simulate_subject", "subject_source"]

_MIN_TISSUE = 1e-3  # floor (in units of the per-scan gain) for image values inside the brain


@dataclass
class SimulatedSubject:
    """One simulated subject on the output grid ``(X, Y, Z)``.

    ``images``: modality -> float32 volume (arbitrary scanner units, 0 outside the brain), with the
    HR scan's Rician noise; ``clean``: the same without noise (bias field included: the noise-free
    render LR scans are simulated from and scored against);
    ``seg``: uint8 labels {0, 1, 2, 4}; ``lesions``: int16 instance map (``keys.py`` encoding);
    ``fractions``: compartment -> float32 volume fraction in [0, 1] (inside the brain the
    fractions of wm, gm, csf, oedema, necrosis, enhancing and lesion sum to 1); ``brain``: bool
    mask; ``affine``: 4 x 4 RAS (mm); ``parameters``: the drawn parameters (JSON-serialisable).
    """

    images: dict[str, np.ndarray]
    clean: dict[str, np.ndarray]
    seg: np.ndarray
    lesions: np.ndarray
    fractions: dict[str, np.ndarray]
    brain: np.ndarray
    affine: np.ndarray
    parameters: dict = field(default_factory=dict)


def subject_source(index: int, test_anatomy: bool = False) -> str:
    """Anatomy source of a subject: the test-only family, or the training families alternating."""
    return TEST_ONLY_SOURCE if test_anatomy else TRAINING_SOURCES[int(index) % len(TRAINING_SOURCES)]


def simulate_subject(
    seed: int,
    index: int,
    size: str = "small",
    held_out: bool = False,
    test_anatomy: bool = False,
    noise: bool = True,
    lesion_contrast: bool = True,
    bias: bool = True,
) -> SimulatedSubject:
    """Simulate subject ``index`` (1-based) of a run with ``seed`` on the ``size`` grid.

    ``held_out`` selects the held-out warp ranges (validation/test subjects); ``test_anatomy``
    the test-only anatomy family (its own subject numbering). ``noise=False`` leaves out the
    Rician noise and ``bias=False`` the bias field (every random draw still happens, so all else
    is identical);
    ``lesion_contrast=False`` gives every lesion the white-matter parameters (what normal tissue
    there would give: the reference for the lesions' invisibility). Deterministic in
    the arguments; output shapes ``SIZES[size][0]`` = (240, 240, 155) at 1 mm or (120, 120, 78)
    at 2 mm.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    shape, spacing = SIZES[size]
    rng = np.random.default_rng([int(seed), int(index), 1] if test_anatomy else [int(seed), int(index)])
    source = subject_source(index, test_anatomy)

    # 1. parameters (draw order is fixed and independent of ``size``)
    anatomy = draw_anatomy(rng, source, held_out)
    tumour = draw_tumour_shape(rng)
    physics = draw_physics(rng)
    acquisition = draw_acquisition(rng, physics.field_T)
    place_brain(anatomy)
    tumour.centre = choose_tumour_centre(rng, anatomy, tumour)
    draw_tumour_fields(rng, tumour)
    axes = grid_axes(shape, spacing)
    gm, wm, mask = sample_source(axes, anatomy, source_maps(source, spacing), tumour)
    same_grid = all(len(a) == len(b) and np.array_equal(a, b) for a, b in zip(axes, probe_axes()))
    lesions, skipped = draw_lesions(rng, anatomy, physics, tumour, probe=(wm, mask) if same_grid else None)

    # 2. anatomy on the output grid
    brain = strip_edge(mask, axes, spacing, anatomy)
    wm, gm, csf = tissue_maps(gm, wm, brain, axes, anatomy)

    # 3. tumour compartments replace the normal tissue fractions
    sl, tumour_local, tumour_texture = tumour_fractions(axes, tumour, wm, csf, brain, spacing)
    fractions = {name: np.zeros(shape, np.float32) for name in TUMOUR_COMPARTMENTS}
    for name in TUMOUR_COMPARTMENTS:
        fractions[name][sl] = tumour_local[name]
    total = fractions["oedema"] + fractions["enhancing"] + fractions["necrosis"]
    fractions = {"wm": wm * (1 - total), "gm": gm * (1 - total), "csf": csf * (1 - total), **fractions}
    seg = np.zeros(shape, np.uint8)
    seg[total >= 0.5] = 2
    seg[fractions["enhancing"] + fractions["necrosis"] >= 0.5] = 4
    seg[fractions["necrosis"] >= 0.5] = 1
    seg[~brain] = 0

    # 4. lesions take the white-matter share of their footprint
    pv, owner, lesion_map = rasterise_lesions(lesions, axes, spacing)
    fractions["lesion"] = (pv * fractions["wm"]).astype(np.float32)
    fractions["wm"] = fractions["wm"] - fractions["lesion"]
    lesion_map[~brain] = 0

    # 5. contrasts: partial-volume signal, bias field, Rician noise, skull stripping
    inside = np.flatnonzero(brain)
    bias_fields = acquisition.bias(*axes).reshape(1 + len(MODALITIES), -1)[:, inside]
    flat = {name: f.reshape(-1)[inside] for name, f in fractions.items()}
    owner_flat = owner.reshape(-1)[inside]
    texture = np.ones(shape, np.float32)
    texture[sl] = tumour_texture  # tumour heterogeneity (a smooth PD-like factor, ~4 mm grain)
    texture = texture.reshape(-1)[inside]
    images, clean_images = {}, {}
    for m, modality in enumerate(MODALITIES):
        clean = np.zeros(inside.size)
        for name in ("wm", "gm", "csf", *TUMOUR_COMPARTMENTS):
            s = compartment_signal(modality, physics, name)
            clean += s * (flat[name] * texture if name in TUMOUR_COMPARTMENTS else flat[name])
        if lesion_contrast:
            clean += flat["lesion"] * lesion_signals(lesions, modality, physics)[owner_flat]
        else:
            clean += flat["lesion"] * compartment_signal(modality, physics, "wm")
        gain = acquisition.gains[modality]
        clean = np.abs(clean) * gain
        if bias:
            clean *= np.exp(acquisition.bias_sd * (0.8 * bias_fields[0] + 0.6 * bias_fields[1 + m]))
        sigma = acquisition.noise_level[modality] * abs(compartment_signal(modality, physics, "wm")) * gain
        n1, n2 = rng.standard_normal(inside.size), rng.standard_normal(inside.size)
        noisy = np.hypot(clean + sigma * n1, sigma * n2) if noise else clean
        volume = np.zeros(int(np.prod(shape)), np.float32)
        volume[inside] = np.maximum(noisy, _MIN_TISSUE * gain)
        images[modality] = volume.reshape(shape)
        volume = np.zeros(int(np.prod(shape)), np.float32)
        volume[inside] = np.maximum(clean, _MIN_TISSUE * gain)
        clean_images[modality] = volume.reshape(shape)
    lr_rng = np.random.default_rng([int(seed), int(index), 1, 2] if test_anatomy else [int(seed), int(index), 2])
    lr_acquisition = draw_lr_acquisition(lr_rng)

    parameters = {
        "subject_index": int(index),
        "seed": int(seed),
        "family": "test_anatomy" if test_anatomy else ("held_out_warp" if held_out else "training_warp"),
        "held_out_anatomy": bool(held_out),
        "anatomy": anatomy.describe(),
        "tumour": {
            "centre_mm": tumour.centre,
            "radius_oedema_mm": tumour.r_oedema,
            "radius_core_mm": tumour.r_core,
            "radius_necrosis_mm": tumour.r_necrosis,
            "mass_effect": tumour.mass_effect,
        },
        "lesions": [lesion.describe() for lesion in lesions],
        "lesions_skipped_no_room": int(skipped),
        "field_T": physics.field_T,
        "tissues_T1_ms_T2_ms_PD_GdmM": {k: list(v) for k, v in physics.tissues.items()},
        "sequences_ms": physics.sequences,
        "gain": acquisition.gains,
        "noise_sigma_fraction_of_wm": acquisition.noise_level,
        "bias_sd": acquisition.bias_sd,
        "bias_grain_mm": acquisition.bias_grain_mm,
        "lr_acquisition": lr_acquisition,
    }
    return SimulatedSubject(images, clean_images, seg, lesion_map, fractions, brain, output_affine(size),
                            to_jsonable(parameters))
