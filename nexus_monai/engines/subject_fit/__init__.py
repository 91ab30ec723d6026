"""Per-subject fitting of the SSMCSR INR (McGinnis et al., MICCAI 2023) on one subject's two LR scans, no HR anywhere.

Data (:mod:`.sampler`). Every LR voxel of each scan inside that scan's signal mask (non-zero voxels
dilated by ``mask_dilation`` LR voxels, so the zero edge around the brain is fitted too) is one
observation: its world position (mm, from the scan's own affine), its intensity divided by the
scan's 99.5th percentile of non-zero voxels (about ``[0, 1]``; outputs are multiplied back) and the
contrast it belongs to. Coordinates go through ONE :class:`~nexus_monai.geometry.WorldNormalizer`
built from both LR grids (never each grid by its own min/max).

Forward models (how the INR ``f`` renders one LR voxel; ``forward_model``;
:mod:`nexus_monai.transforms.observations`):

* ``"point"`` (the paper and its code): ``f`` at the LR voxel centre.
* ``"profile"`` (OURS, beyond the paper): the slice-profile-weighted average of ``f`` at the HR
  sample positions of the voxel's slab, with the weights of the acquisition operator itself
  (:func:`~nexus_monai.transforms.acquisition.slice_profile_matrix` on the HR grid whose thick-slice
  acquisition is exactly the LR grid, :func:`~nexus_monai.transforms.consistency.natural_hr_grid`). Taps
  below ``tap_threshold`` x the row's largest weight are dropped and the rest renormalised
  (0.02 keeps 4 taps at factor 2 and 10 at factor 4 for the Gaussian profile, >98 % of the mass).
  The thick axis and factor come from the scan's ``meta["acquisition"]`` when it was simulated here,
  else from its affine (largest spacing relative to the other two, in-plane spacing assumed equal);
  an isotropic scan falls back to ``point``.

Loss, schedule and point-model warm-up: :mod:`.workflow` (measured on a 2 mm subject the warm-up is
what makes the profile model pay off within a CPU budget, see ``bundles/ssmcsr/docs/README.md``).
MI early stopping and the other handlers: :mod:`.handlers`. Settings: :mod:`.options`. Rendering a
fit on a grid: :mod:`.result`. Files, the datalist runner and its report: :mod:`.files`.

The loop is an ignite :class:`~ignite.engine.Engine` (:class:`SubjectFitWorkflow`); the JSON log holds
the settings, the loss and MI curves, the stop epoch and reason (``mi_plateau``, ``max_epochs``,
``time_budget``) and times.
"""

from __future__ import annotations

from nexus_monai.engines.subject_fit.files import (
    OUTPUT_NAMES,
    FitSubjectsReport,
    FitSubjectStep,
    check_datalist,
    fit_files,
    write_fit_outputs,
)
from nexus_monai.engines.subject_fit.handlers import EpochLosses, MIEarlyStopping, MIPlateau, TimeBudget
from nexus_monai.engines.subject_fit.options import FORWARD_MODELS, SubjectFitOptions
from nexus_monai.engines.subject_fit.result import SubjectFit, render_grid
from nexus_monai.engines.subject_fit.sampler import ObservationBatches, mi_probe
from nexus_monai.engines.subject_fit.workflow import SubjectFitter, SubjectFitWorkflow, check_subject_scans
from nexus_monai.keys import CONTRASTS
from nexus_monai.transforms.observations import LRObservations, lr_observations

__all__ = ["FORWARD_MODELS", "CONTRASTS", "OUTPUT_NAMES", "LRObservations", "lr_observations", "MIPlateau",
           "SubjectFitOptions", "SubjectFitter", "SubjectFitWorkflow", "SubjectFit", "render_grid", "write_fit_outputs",
           "check_datalist", "FitSubjectStep", "FitSubjectsReport", "fit_files", "check_subject_scans",
           "ObservationBatches", "mi_probe", "EpochLosses", "MIEarlyStopping", "TimeBudget"]
