"""Serving nexus_monai models over HTTP (``nexus-sr serve``) and to MONAI Label.

``params`` (what a request asks), ``uploads`` (NIfTI-only uploads, safe names), ``models``
(a bundle loaded once, predicting through ``predict_files``), ``limits`` (body-size limit,
bounded inference queue), ``responses`` (NIfTI / zip / multipart / JSON answers), ``app``
(the FastAPI application), ``server`` (uvicorn on a bound socket), ``loadtest`` (client-side
latency/throughput), ``monailabel_app/`` (a MONAI Label app over the same models).
Nothing heavy is imported here.
"""
