"""Settings of one SSMCSR subject fit (McGinnis et al., MICCAI 2023) as a frozen dataclass.

Defaults are the CPU setting documented in ``bundles/ssmcsr/docs/README.md``; the paper's values
are given in brackets in :class:`SubjectFitOptions`. Bad values raise one-line
:class:`~nexus_monai.errors.NexusInputError` s when the options are built, before any work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from nexus_monai.errors import NexusInputError
from nexus_monai.networks.ssmcsr import SSMCSR_VARIANTS
from nexus_monai.transforms.acquisition import PROFILES

__all__ = ["FORWARD_MODELS", "SubjectFitOptions"]

FORWARD_MODELS = ("point", "profile")


@dataclass(frozen=True)
class SubjectFitOptions:
    """Every setting of a subject fit (paper values in brackets).

    variant: ``split_head`` | ``vanilla`` | ``single``. forward_model: ``profile`` (ours) | ``point``
    [paper]. profile: slice profile of the ``profile`` model (the acquisition's: gaussian|boxcar|none).
    tap_threshold: relative weight below which profile taps are dropped. hidden, trunk_layers,
    head_hidden: network size [1024, 5, 512]. num_frequencies, sigma: Fourier features [256 -> 512
    features, 4]. learning_rate [4e-4], batch_size (LR voxels per step) [1000], epochs (passes over
    all observations) [50], max_seconds: wall-clock budget of the fit, prediction excluded (None:
    none; the default 840 s leaves a 15-minute budget room for rendering the output). alpha, beta:
    loss weights of T1w / T2w [1, 1]. mask_dilation: LR voxels around the signal. point_warmup:
    fraction of the run fitted with the cheap point model before the ``profile`` model takes over
    (ours; 0: none). early_stopping: MI plateau rule (ignored for ``single``); mi_every (epochs),
    mi_points, mi_patience, mi_tolerance (nats). seed: network initialisation, Fourier matrix, batch
    order, MI sample.
    """

    variant: str = "split_head"
    forward_model: str = "profile"
    profile: str = "gaussian"
    tap_threshold: float = 0.02
    hidden: int = 256
    trunk_layers: int = 5
    head_hidden: int = 128
    num_frequencies: int = 256
    sigma: float = 4.0
    learning_rate: float = 2e-3
    batch_size: int = 250
    epochs: int = 50
    max_seconds: float | None = 840.0
    alpha: float = 1.0
    beta: float = 1.0
    mask_dilation: int = 1
    point_warmup: float = 0.4
    early_stopping: bool = True
    mi_every: int = 1
    mi_points: int = 32768
    mi_patience: int = 3
    mi_tolerance: float = 0.002
    seed: int = 0

    def __post_init__(self):
        if self.variant not in SSMCSR_VARIANTS:
            raise NexusInputError(None, f"unknown SSMCSR variant {self.variant!r}; "
                                        f"choose one of {', '.join(SSMCSR_VARIANTS)}")
        if self.forward_model not in FORWARD_MODELS:
            raise NexusInputError(None, f"unknown forward model {self.forward_model!r}; "
                                        f"choose one of {', '.join(FORWARD_MODELS)}")
        if self.profile not in PROFILES:
            raise NexusInputError(None, f"unknown slice profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        bad_budget = self.max_seconds is not None and not float(self.max_seconds) > 0
        if int(self.batch_size) < 1 or int(self.epochs) < 1 or bad_budget:
            raise NexusInputError(None, "batch_size and epochs must be >= 1 and max_seconds > 0")
        types = {"tap_threshold": float, "hidden": int, "trunk_layers": int, "head_hidden": int,
                 "num_frequencies": int, "sigma": float, "learning_rate": float, "batch_size": int, "epochs": int,
                 "alpha": float, "beta": float, "mask_dilation": int, "point_warmup": float, "early_stopping": bool,
                 "mi_every": int, "mi_points": int, "mi_patience": int, "mi_tolerance": float, "seed": int}
        for name, kind in types.items():
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.max_seconds is not None:
            object.__setattr__(self, "max_seconds", float(self.max_seconds))

    @property
    def loss_weights(self) -> dict[str, float]:
        """``{"t1": alpha, "t2": beta}``."""
        return {"t1": self.alpha, "t2": self.beta}

    @property
    def mi_stopping(self) -> bool:
        """Whether the MI plateau stops the fit (multi-contrast variants with ``early_stopping``)."""
        return self.early_stopping and self.variant != "single"

    def as_dict(self) -> dict:
        """The settings as a plain dict (the ``settings`` of the fit log)."""
        return asdict(self)
