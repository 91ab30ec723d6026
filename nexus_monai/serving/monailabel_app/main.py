"""The nexus_monai MONAI Label app: ``monailabel start_server --app <this folder> --studies <scans>``.

Written against MONAI Label 0.8 (``monailabel.interfaces.app.MONAILabelApp``). Models are bundle
folders, loaded once at start-up, chosen with ``--conf``:

* ``bundles``: comma-separated bundle folders (default ``bundles/nexus_inr``; relative to the
  folder the server is started from, normally the repository root);
* ``weights`` / ``config``: comma-separated ``[MODEL=]PATH`` (as ``nexus-sr serve --weights/--config``);
* ``device``: ``cpu``, ``cuda:0`` ... (default: the bundle's).

Each bundle is one infer model named by its folder (``nexus_inr``). The studies folder holds each
subject's LR scans side by side, named so the contrast token tells them apart
(``sub01_t1.nii.gz`` + ``sub01_t2.nii.gz``; BraTS ``-t1n``/``-t2w``; BIDS ``_T1w``/``_T2w``).
Running the model on either scan returns that contrast super-resolved onto the requested grid.
"""

from __future__ import annotations

import logging
import os
from typing import Dict

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

import nexus_monai
from nexus_monai.serving.models import load_models
from nexus_monai.serving.monailabel_app.lib.infers.nexus_sr import NexusSRInfer

logger = logging.getLogger(__name__)


def _conf_list(conf: dict, key: str) -> list[str]:
    return [v.strip() for v in str(conf.get(key) or "").split(",") if v.strip()]


class NexusSRApp(MONAILabelApp):
    """Super-resolution models of nexus_monai as MONAI Label infer tasks (no trainers: bundles train themselves)."""

    def __init__(self, app_dir, studies, conf):
        self.models = load_models(_conf_list(conf, "bundles") or ["bundles/nexus_inr"], _conf_list(conf, "config"),
                                  _conf_list(conf, "weights"), device=conf.get("device") or None)
        logger.info("+++ nexus_monai models: %s", ", ".join(self.models))
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="nexus_monai super-resolution",
                         description="Arbitrary-scale multi-contrast brain-MRI super-resolution (T1w + T2w LR scans -> "
                                     "any grid)",
                         version=nexus_monai.__version__, labels=[])

    def init_infers(self) -> Dict[str, InferTask]:
        return {name: NexusSRInfer(model) for name, model in self.models.items()}

    def infer(self, request, datastore=None):
        """MONAI Label's infer, with two guards: the SR volume is never saved as a label of the scan,
        and the other contrast comes from the datastore (``companion`` = an image id), never from a client path."""
        request = dict(request)
        request.pop("companion_path", None)
        companion = request.pop("companion", None)
        if companion:
            uri = (datastore or self.datastore()).get_image_uri(str(companion))
            if uri and os.path.isfile(uri):
                request["companion_path"] = uri
        request["save_label"] = False
        return super().infer(request, datastore)
