"""A MONAI Label app serving the nexus_monai bundles (``monailabel start_server --app <this folder>``).

``main.py`` (the ``MONAILabelApp``) and ``lib/infers/nexus_sr.py`` (the ``BasicInferTask``) need
``monailabel`` (>= 0.8) and are imported only by MONAI Label; the request handling they run,
``lib/infers/sr_request.py``, is plain Python and is tested without it. See ``README.md``.
"""
