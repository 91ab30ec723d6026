"""``NexusSRInfer``: a MONAI Label ``BasicInferTask`` serving one nexus_monai super-resolution bundle.

Needs ``monailabel`` (written against 0.8's API: ``monailabel.tasks.infer.basic_infer.BasicInferTask``,
``monailabel.interfaces.tasks.infer_v2.InferType``); importing this module without it raises an
ImportError that says so. The work is done by :mod:`sr_request` (plain Python, tested here):
pre-transform = find the subject's other contrast + parse params, inferer = ``predict_files``
through the bundle loaded once, writer = the requested contrast as one NIfTI.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

try:
    from monailabel.interfaces.tasks.infer_v2 import InferType
    from monailabel.tasks.infer.basic_infer import BasicInferTask
except ImportError as err:  # pragma: no cover - monailabel cannot be installed beside monai 1.6 here
    raise ImportError("the nexus_monai MONAI Label app needs monailabel>=0.8 (pip install monailabel); "
                      "without it use `nexus-sr serve`, the same REST shape") from err

from nexus_monai.serving.models import BundleModel
from nexus_monai.serving.monailabel_app.lib.infers.sr_request import PrepareSRRequest, predict_request, write_result

__all__ = ["NexusSRInfer"]


class NexusSRInfer(BasicInferTask):
    """Super-resolve the subject of ``image`` (T1w or T2w; the other contrast is found beside it).

    Args:
        model: a loaded :class:`~nexus_monai.serving.models.BundleModel` (loaded once, shared by requests).
        workdir: parent of the per-request temporary folders (default: the system temp dir).

    Request keys (MONAI Label merges the client's ``params`` into the request): ``spacing`` (mm,
    1 or 3 numbers) or ``like`` (``"t1"``/``"t2"``: the grid of that scan), ``contrast``
    (default: the contrast of ``image``), ``refine_seconds`` (test-time refinement budget, default 0)
    and ``guard`` (data-consistency guard, default true). The result is that contrast's SR volume (a
    NIfTI with the target grid's affine) and a JSON with the grid and the guard's residual summary
    (MONAI Label returns one image, so the residual map itself is not sent; ``nexus-sr serve`` with
    ``output=all`` sends it).
    """

    def __init__(self, model: BundleModel, workdir: str | None = None):
        self.model = model
        self.workdir = workdir
        super().__init__(
            path=str(model.weights),
            network=model.network,
            type=InferType.OTHERS,
            labels=[],
            dimension=3,
            description=model.info()["description"],
            # shown to clients; empty = the model default
            config={"spacing": "", "like": "", "contrast": "", "refine_seconds": "", "guard": ""},
            load_strict=True,
        )

    def is_valid(self) -> bool:
        return self.model.weights.is_file()

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [PrepareSRRequest(self.model.inputs, self.model.outputs)]

    def inverse_transforms(self, data=None):
        return None

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        """The bundle's own inferer over the whole target grid (``predict_files``); ``device`` is the model's."""
        return predict_request(self.model, data, self.workdir)

    def writer(self, data: Dict[str, Any], extension=None, dtype=None) -> Tuple[Any, Any]:
        return write_result(data, self.model.name)
