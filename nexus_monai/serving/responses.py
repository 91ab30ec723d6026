"""Answers of ``POST /infer/{model}``: one NIfTI, a zip, a multipart body (MONAI Label's shape) or JSON.

Every body is built in memory from the files ``predict_files`` wrote, so the request's temporary
folder can be removed before the answer is sent.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from pathlib import Path
from typing import Mapping

from fastapi.responses import JSONResponse, Response

__all__ = ["nifti_response", "zip_response", "multipart_response", "json_response", "RESULT_JSON"]

RESULT_JSON = "result.json"


def _media_type(name: str) -> str:
    return "application/gzip" if name.endswith(".gz") else "application/octet-stream"


def _attachment(name: str) -> dict:
    return {"content-disposition": f'attachment; filename="{name}"'}


def nifti_response(path: Path, meta: Mapping) -> Response:
    """The single SR volume; its metadata travels in the ``x-nexus-result`` header (compact JSON)."""
    headers = {**_attachment(path.name), "x-nexus-result": json.dumps(meta, separators=(",", ":"))}
    return Response(content=path.read_bytes(), media_type=_media_type(path.name), headers=headers)


def zip_response(files: Mapping[str, Path], meta: Mapping, archive_name: str = "sr.zip") -> Response:
    """``application/zip`` with every output NIfTI (stored, already gzip-compressed) and ``result.json``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in files.values():
            archive.write(path, arcname=path.name)
        archive.writestr(RESULT_JSON, json.dumps(meta, indent=2) + "\n")
    return Response(content=buffer.getvalue(), media_type="application/zip", headers=_attachment(archive_name))


def multipart_response(files: Mapping[str, Path], meta: Mapping) -> Response:
    """``multipart/form-data`` as MONAI Label's ``output=all``: a ``params`` JSON part, then one part per contrast."""
    boundary = uuid.uuid4().hex
    chunks = [
        (f'--{boundary}\r\ncontent-disposition: form-data; name="params"\r\n'
         'content-type: application/json\r\n\r\n').encode(),
        json.dumps(meta).encode(),
        b"\r\n",
    ]
    for field, path in files.items():
        chunks += [f'--{boundary}\r\ncontent-disposition: form-data; name="{field}"; filename="{path.name}"\r\n'
                   f"content-type: {_media_type(path.name)}\r\n\r\n".encode(), path.read_bytes(), b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return Response(content=b"".join(chunks), media_type=f"multipart/form-data; boundary={boundary}")


def json_response(meta: Mapping) -> JSONResponse:
    return JSONResponse(dict(meta))
