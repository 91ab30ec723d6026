"""The any-protocol weights with the consistency layer removed (raw network output) on two grid entries, beside
trilinear and ibp (the diagnostic of docs/any_protocol.md): python scripts/any_protocol_raw_eval.py (after
training configs/any_protocol.yaml). Rows in runs/g28/grid_raw."""
import copy

from nexus_monai.engines.bundle_model import bundle_folder, bundle_model
from nexus_monai.engines.predict import predict_volumes
from nexus_monai.evaluation.methods import ANY_PROTOCOL_OVERLAY, register_method
from nexus_monai.evaluation.protocol_grid import run_protocol_grid
from nexus_monai.transforms.protocols import protocol_grid

W = "bundles/nexus_inr/models_any_protocol/model.pt"

@register_method("any_protocol_raw")
def raw(inputs, grid, **_):
    net, inf = bundle_model("bundles/nexus_inr", (str(bundle_folder(ANY_PROTOCOL_OVERLAY)),), str(bundle_folder(W)))
    net = copy.deepcopy(net)
    net.consistency = None
    return predict_volumes(net, inputs["t1_lr"], inputs["t2_lr"], grid, inf)


if __name__ == "__main__":
    run_protocol_grid(protocol_grid("nexus,t1x2_t2z4"), ["trilinear", "ibp", "any_protocol_raw"], "runs/g28/grid_raw",
                      splits=["test_anatomy"], data="embedded", seed=0, max_subjects=2, max_subjects_full=2,
                      progress=False)
