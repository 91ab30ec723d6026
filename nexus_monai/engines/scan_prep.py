"""Real scans to network inputs: the brain mask (given, ROBEX, or a refusal) and T2w -> T1w registration.

Order (:func:`prepare_scans`), each step on the scans as read, before any long work:

1. Background: ``mask`` (a file on the T1w grid, :func:`~nexus_monai.data.mask.load_mask`),
   ``skull_strip`` (ROBEX on the T1w, :func:`~nexus_monai.data.skull.robex_mask`), or, with
   neither, both scans must have a zero background (:func:`~nexus_monai.data.mask.check_zero_background`:
   one-line refusal otherwise) unless ``keep_background``.
2. Registration (``register``, default on): the UNMASKED T2w rigidly to the unmasked T1w
   (:func:`~nexus_monai.transforms.registration.register_rigid`; a head registers on the whole
   head), written into the T2w affine only; an implausible or failed result keeps the header and
   is reported as a warning.
3. The T1w mask carried to the T2w grid through the (corrected) T2w affine
   (:func:`~nexus_monai.data.mask.mask_on_grid`), and both scans zeroed outside their masks.

The report (``"registration"``: :class:`~nexus_monai.transforms.registration.RegistrationResult`
as a dict, ``"mask"``: where the mask came from, voxels, ROBEX seconds) is what ``predict`` and
``fit-subject`` store as ``registration.json`` beside their outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping

from monai.data import MetaTensor

from nexus_monai.data.mask import apply_mask, check_zero_background, load_mask, mask_on_grid
from nexus_monai.data.skull import robex_mask
from nexus_monai.errors import NexusInputError
from nexus_monai.transforms.registration import RegisterToReference, RegistrationOptions

__all__ = ["ScanOptions", "prepare_scans", "REGISTRATION_NAME", "report_json", "warning_line"]

REGISTRATION_NAME = "registration.json"
"""The file beside the outputs holding the estimated motion and the mask's origin."""


@dataclass(frozen=True)
class ScanOptions:
    """How ``predict`` / ``fit-subject`` treat real scans (the CLI's ``--mask``, ``--skull-strip``,
    ``--keep-background``, ``--no-register``). ``ScanOptions()`` is the CLI's default."""

    mask: str | os.PathLike | None = None
    skull_strip: bool = False
    keep_background: bool = False
    register: bool = True
    registration: RegistrationOptions = RegistrationOptions()

    def __post_init__(self):
        if self.mask is not None and self.skull_strip:
            raise NexusInputError(self.mask, "give either --mask or --skull-strip, not both")


def prepare_scans(lr: Mapping[str, MetaTensor], sources: Mapping[str, str],
                  options: ScanOptions) -> tuple[dict[str, MetaTensor], dict]:
    """``({"t1", "t2"}: masked, registered scans, report)`` from the scans as read (see the module doc).

    Raises a one-line :class:`NexusInputError` for a mask on another grid, an empty or unreadable
    mask, a failed skull stripping, or a non-zero background without mask / skull stripping.
    """
    t1, t2 = lr["t1"], lr["t2"]
    report: dict = {}
    mask = None
    if options.mask is not None:
        if not os.path.exists(str(options.mask)):
            raise NexusInputError(options.mask, "mask file not found")
        mask = load_mask(options.mask, t1)
        report["mask"] = {"source": str(options.mask)}
    elif options.skull_strip:
        mask, seconds = robex_mask(t1, sources.get("t1"))
        report["mask"] = {"source": "ROBEX (--skull-strip) on the T1w", "seconds": round(seconds, 1)}
    elif not options.keep_background:
        check_zero_background(t1, sources.get("t1"), "T1w scan")
        check_zero_background(t2, sources.get("t2"), "T2w scan")
    if options.register:
        t2 = RegisterToReference(options.registration)(t2, t1)
        report["registration"] = t2.meta["registration"]
    if mask is not None:
        mask_t2 = mask_on_grid(mask, t2)
        report["mask"].update({"t1_voxels": int(mask.sum()), "t2_voxels": int(mask_t2.sum())})
        t1, t2 = apply_mask(t1, mask), apply_mask(t2, mask_t2)
    return {"t1": t1, "t2": t2}, report


def report_json(report: Mapping) -> str:
    """The report as the text of ``registration.json``."""
    return json.dumps(report, indent=2, default=float) + "\n"


def warning_line(report: Mapping) -> str | None:
    """One warning line when the registration was tried and NOT applied for a reason other than size or a
    negligible motion."""
    reg = report.get("registration")
    if not reg or reg.get("accepted") or str(reg.get("reason", "")).startswith(("too few voxels", "negligible")):
        return None
    return f"warning: T2w -> T1w registration not applied, the T2w header is kept ({reg.get('reason')})"
