"""Answer malformed requests with a 400 instead of MONAI Label's bare 500.

MONAI Label's infer endpoint parses the ``params`` form field with ``json.loads`` before the app sees the request,
so a non-JSON value surfaces as an unhandled exception. The route calls ``run_inference`` through its module at
request time; wrapping that one function validates ``params`` first and leaves everything else untouched.
"""
from __future__ import annotations

import functools

from .transforms import parse_params


def install() -> None:
    from monailabel.endpoints import infer as infer_endpoint

    original = infer_endpoint.run_inference
    if getattr(original, "_textdiff_guarded", False):
        return

    @functools.wraps(original)
    def run_inference(*args, **kwargs):
        params = kwargs.get("params", args[4] if len(args) > 4 else "{}")
        parse_params(params if isinstance(params, str) else "{}")  # raises HTTPException(400) with the reason
        return original(*args, **kwargs)

    run_inference._textdiff_guarded = True
    infer_endpoint.run_inference = run_inference
