"""The REST service of ``nexus-sr serve``: MONAI Label's ``GET /info/`` and ``POST /infer/{model}`` (FastAPI).

``POST /infer/{model}`` takes ``multipart/form-data``:

* uploads ``t1`` and ``t2`` (NIfTI, checked by magic bytes, or a zip of one DICOM series: see
  :mod:`nexus_monai.serving.uploads` for its zip-slip and size limits), or ``file`` parts as MONAI Label
  sends them (their contrasts in ``params.modalities`` order, default t1 then t2), and
  optionally ``like`` (a reference NIfTI whose grid the output takes);
* ``params``: a JSON object (see :mod:`nexus_monai.serving.params`: spacing / like / contrast / output);
* query ``?output=image|zip|all|json``: ``image`` is the SR NIfTI when one contrast is asked
  for and a zip of both otherwise, ``zip`` always a zip (+ ``result.json``), ``all`` MONAI
  Label's multipart (``params`` JSON + one part per contrast), ``json`` metadata only.

Every refusal is ``{"detail": "<source>: <problem>", "status", "source", "problem"}`` with a 4xx
status (404 unknown model, 400 malformed request / missing modality / unsafe filename, 413 body
or declared volume too large, 415 not NIfTI, 422 unreadable or unusable scan, 503 queue full); an unexpected failure
is a 500 whose body carries only a reference id (the traceback goes to the server log).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Mapping

import monai
import nibabel as nib
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import nexus_monai
from nexus_monai.data.dicom import load_scan
from nexus_monai.errors import NexusInputError, find_input_error
from nexus_monai.serving.cancel import JobCancelled, cancellable
from nexus_monai.serving.limits import BodySizeLimit, BodyTooLarge, InferenceQueue
from nexus_monai.serving.models import BundleModel
from nexus_monai.serving.params import LIKE_FIELD, InferParams, ServingError, parse_params
from nexus_monai.serving.responses import json_response, multipart_response, nifti_response, zip_response
from nexus_monai.serving.uploads import check_filename, store_upload, upload_label

__all__ = ["create_app"]

logger = logging.getLogger("nexus_monai.serving")

_MAX_FORM_FIELDS = 16
_MAX_PARAMS_BYTES = 64 * 1024


def _error_response(err: ServingError) -> JSONResponse:
    return JSONResponse({"detail": str(err), "status": err.status, "source": err.source, "problem": err.problem},
                        status_code=err.status)


def _input_error(err: NexusInputError, labels: Mapping[str, str], folder: Path) -> ServingError:
    """A :class:`NexusInputError` about a stored upload, re-worded with the upload's name (server paths never leave)."""
    problem = err.problem
    for path, label in labels.items():
        problem = problem.replace(path, label)
    problem = problem.replace(str(folder), "<request>")
    return ServingError(422, problem, labels.get(err.source or "", "request"))


def _header_info(path: Path) -> dict:
    if path.is_dir():  # an uploaded DICOM series (read and checked by the job already)
        volume = load_scan(path)
        shape, affine = volume.shape[1:], volume.affine.numpy()
    else:
        img = nib.load(str(path))
        shape, affine = img.shape, np.asarray(img.affine, dtype=float)
    return {"shape": [int(s) for s in shape],
            "spacing_mm": [round(float(v), 6) for v in np.linalg.norm(affine[:3, :3], axis=0)],
            "affine": [[float(v) for v in row] for row in affine]}


def _predict_job(model: BundleModel, scans: dict, out_dir: Path, params: InferParams, submitted: float,
                 cancel: threading.Event | None = None) -> dict:
    started = time.perf_counter()
    event = cancel or threading.Event()
    if event.is_set():
        raise JobCancelled("the client disconnected before its job started")
    with cancellable(event):
        result = model.predict(scans, out_dir, params)
    return {"result": result, "queue_wait_s": started - submitted, "inference_s": time.perf_counter() - started}


class ClientGone(Exception):
    """The client closed the connection while its job waited or ran (nobody to answer)."""


async def _wait_unless_disconnected(future, request: Request, cancel: threading.Event, queue: InferenceQueue,
                                    poll_s: float = 0.25):
    """The job's result; if the client disconnects first, cancel the job (a queued one never starts, a
    running one stops at its next network call) so the worker is free, and raise :class:`ClientGone`."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=poll_s)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            cancel.set()
            future.cancel()
            queue.note_cancelled()
            logger.info("client disconnected; its job was cancelled")
            raise ClientGone()


def _remove_when_done(folder: Path, future) -> None:
    if future is None or future.done():
        shutil.rmtree(folder, ignore_errors=True)
    else:  # the client went away while its job runs: clean up when the job ends
        future.add_done_callback(lambda _f: shutil.rmtree(folder, ignore_errors=True))


def create_app(models: Mapping[str, BundleModel], *, max_upload_bytes: int = 512 << 20, workers: int = 1,
               max_queue: int = 16,
               workdir: str | Path | None = None) -> FastAPI:
    """The FastAPI application serving ``models`` (loaded once, by the caller).

    Args:
        models: ``{name: BundleModel}``; ``POST /infer/{name}``.
        max_upload_bytes: request bodies above this get 413 (counted while they stream in).
        workers: inference threads; ``max_queue``: requests waiting or running before 503.
        workdir: parent of the per-request temporary folders (default: the system temp dir);
            each folder is removed when its request ends.
    """
    queue = InferenceQueue(workers=workers, max_pending=max_queue)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        queue.shutdown()

    app = FastAPI(
        title="nexus_monai super-resolution",
        version=nexus_monai.__version__,
        lifespan=lifespan,
        description="MONAI-Label-style inference service: GET /info/, POST /infer/{model} with NIfTI uploads.",
    )
    work_root = Path(workdir) if workdir else Path(tempfile.gettempdir())
    work_root.mkdir(parents=True, exist_ok=True)
    app.state.queue = queue
    app.state.models = dict(models)
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes)

    @app.exception_handler(ServingError)
    async def _serving_error(_request: Request, err: ServingError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, err: RequestValidationError):
        first = (err.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return _error_response(ServingError(422, first.get("msg", "invalid request"), where))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception):
        ref = uuid.uuid4().hex[:12]
        logger.error("unexpected error (reference %s)", ref, exc_info=err)
        return JSONResponse({"detail": f"internal server error (reference {ref}); see the server log", "status": 500,
                             "source": "server", "problem": "internal server error"}, status_code=500)

    @app.get("/info/")
    async def info():
        """MONAI Label's app info: name, description, version, models (inputs, labels, description, versions)."""
        return {
            "name": "nexus_monai",
            "description": "Arbitrary-scale multi-contrast brain-MRI super-resolution (MONAI): T1w + T2w LR scans in, "
                           "both on any grid out",
            "version": nexus_monai.__version__,
            "versions": {"nexus_monai": nexus_monai.__version__, "monai": monai.__version__,
                         "torch": torch.__version__},
            "labels": [],
            "models": {name: m.info() for name, m in models.items()},
            "trainers": {}, "strategies": {}, "scoring": {}, "train_stats": {}, "datastore": {},
            "limits": {"max_upload_bytes": int(max_upload_bytes),
                       "accepted": "single-file NIfTI-1/NIfTI-2, .nii or .nii.gz (checked by magic bytes), or a "
                                   "zip of one DICOM series"},
            "queue": queue.stats(),
        }

    @app.post("/infer/{model}")
    async def infer(model: str, request: Request, output: str | None = None):
        """Super-resolve one subject's uploads with ``model`` (see the module docstring for the fields)."""
        if model not in models:
            raise ServingError(404, f"unknown model; available: {', '.join(models) or 'none'}", model)
        served = models[model]
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise ServingError(415,
                               "send multipart/form-data with NIfTI uploads (t1, t2 or file parts) and an optional "
                               "params JSON field", "request")
        try:
            form = await request.form(max_files=_MAX_FORM_FIELDS, max_fields=_MAX_FORM_FIELDS,
                                      max_part_size=_MAX_PARAMS_BYTES)
        except BodyTooLarge:
            raise
        except Exception as err:  # noqa: BLE001 - any parser failure is the client's malformed body
            detail = getattr(err, "detail", None) or type(err).__name__
            raise ServingError(400, f"malformed multipart body ({detail})", "request") from None
        folder = Path(tempfile.mkdtemp(prefix="nexus-req-", dir=work_root))
        future = None
        try:
            texts = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            uploads = [(k, v) for k, v in form.multi_items() if not isinstance(v, str)]
            unknown = sorted(set(texts) - {"params"})
            if unknown:
                raise ServingError(400, f"unexpected form fields {unknown} (only 'params' and the uploads)", "request")
            params = parse_params(texts.get("params"), served.inputs, served.outputs, query_output=output)
            scans: dict[str, Path] = {}
            labels: dict[str, str] = {}
            file_parts = iter(params.modalities)
            for key, upload in uploads:
                field = key
                if key == "file":
                    field = next(file_parts, None)
                    if field is None:
                        raise ServingError(400, f"more 'file' parts than params.modalities {list(params.modalities)}",
                                           "file")
                elif key not in (*served.inputs, LIKE_FIELD):
                    raise ServingError(400,
                                       f"unexpected upload field; {model} takes {list(served.inputs)} (or 'file' "
                                       f"parts) and 'like'", key)
                if field in scans:
                    raise ServingError(400, "uploaded twice", field)
                name = check_filename(upload.filename, field)
                label = upload_label(field, name)
                scans[field] = await run_in_threadpool(store_upload, upload.file, folder, field, label,
                                                       served.max_output_voxels)
                labels[str(scans[field])] = label
            missing = [c for c in served.inputs if c not in scans]
            if missing:
                raise ServingError(400,
                                   f"missing modality {missing[0]}: {model} needs uploads {list(served.inputs)} (got "
                                   f"{sorted(scans) or 'none'})", missing[0])
            submitted = time.perf_counter()
            cancel = threading.Event()
            future = queue.submit(_predict_job, served, scans, folder / "out", params, submitted, cancel)
            try:
                job = await _wait_unless_disconnected(future, request, cancel, queue)
            except ClientGone:
                return JSONResponse({"detail": "client closed the request", "status": 499, "source": "request",
                                     "problem": "client closed the request"}, status_code=499)
            except ServingError:
                raise
            except Exception as err:
                found = find_input_error(err)
                if found is None:
                    raise
                raise _input_error(found, labels, folder) from None
            result = job["result"]
            files = {c: Path(result[c]) for c in params.contrasts}
            meta = {
                "model": model,
                "version": served.version,
                "weights_sha256": served.weights_sha256,
                "contrasts": list(params.contrasts),
                "files": {c: p.name for c, p in files.items()},
                "grid": _header_info(files[params.contrasts[0]]),
                "inputs": {
                    c: {"upload": labels[str(p)], **{k: v for k, v in _header_info(p).items() if k != "affine"}}
                    for c, p in scans.items()
                },
                "params": {
                    "spacing_mm": None if params.spacing_mm is None else list(params.spacing_mm),
                    "like": params.like,
                    "output": params.output,
                    "refine_seconds": params.refine_seconds,
                    "guard": params.guard,
                },
                "ignored_params": list(params.ignored),
                "latency_s": {
                    "queue_wait": round(job["queue_wait_s"], 4),
                    "inference": round(job["inference_s"], 4),
                    "total": round(time.perf_counter() - submitted, 4),
                },
            }
            if "consistency" in result:
                meta["consistency"] = {c: result["consistency"][c] for c in params.contrasts}
            if "refine" in result:
                meta["refine"] = {
                    k: result["refine"][k]
                    for k in ("chosen", "iterations", "seconds", "cohort_holdout_mse", "best_holdout_mse")
                }
            if params.output == "json":
                return json_response(meta)
            if params.output == "all":  # with the guard's residual maps (parts t1_consistency / t2_consistency)
                maps = {
                    f"{c}_consistency": Path(result[f"{c}_consistency"])
                    for c in params.contrasts
                    if f"{c}_consistency" in result
                }
                return multipart_response({**files, **maps}, meta)
            if params.output == "image" and len(files) == 1:
                return nifti_response(next(iter(files.values())), meta)
            return zip_response(files, meta, archive_name=f"{model}_sr.zip")
        finally:
            await form.close()
            _remove_when_done(folder, future)

    return app
