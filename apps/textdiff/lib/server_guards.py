"""The server's HTTP surface, closed to hostile clients.

MONAI Label 0.8.5's own routes trust their clients: upload names become paths, infer ``params`` may set the image
path or save the prediction as the annotator's label, the CORS policy echoes any origin, and the infer route runs
the model on the event loop (nothing else is answered meanwhile). ``install`` replaces, on the running FastAPI
app, the routes that take files (infer, image and label uploads) with checked ones that run in worker threads,
refuses the routes this app does not offer (WSI infer, model-file upload, sessions), and sets the CORS policy
from ``--conf cors_origins`` (none by default). Ids, tags and paths are checked by the datastore, below every route.
"""
from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

from fastapi import Depends, File, Form, HTTPException, UploadFile
from fastapi.background import BackgroundTasks
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from monailabel.config import settings as server_settings
from monailabel.endpoints import infer as infer_endpoint
from monailabel.endpoints import train as train_endpoint
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from textdiff.accel.heap import release_free_heap

from .security import IMAGE_EXTENSIONS, LABEL_EXTENSIONS, LoopbackClientsOnly, check_infer_params, split_extension
from .settings import AppSettings
from .transforms import bad_request, parse_params

CHUNK = 1 << 20
STOP_GRACE_S = 60.0  # a stopped training may finish its epoch and publish for this long before it is killed
ROLE_USER = server_settings.MONAI_LABEL_AUTH_ROLE_USER
ROLE_ANNOTATOR = server_settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
ROLE_ADMIN = server_settings.MONAI_LABEL_AUTH_ROLE_ADMIN
REFUSED_ROUTES = [("POST", "/infer/wsi/{model}"), ("POST", "/infer/wsi_v2/{model}"), ("PUT", "/model/{model}"),
                  ("DELETE", "/model/{model}"), ("PUT", "/session/")]


def _training_runs() -> bool:
    from monailabel.utils.async_tasks.utils import background_processes

    return any(p.poll() is None for p in background_processes.get("train", {}).values())


@functools.cache
def uploads_dir() -> Path:
    """A private folder (mode 0700) for the uploads of this process; inference accepts paths only from here."""
    return Path(tempfile.mkdtemp(prefix="textdiff-uploads-"))


def receive_upload(upload: UploadFile, extensions: tuple[str, ...], max_bytes: int, what: str) -> str:
    """The upload copied into ``uploads_dir()`` under a fresh name with its checked extension; refused (and
    removed) past ``max_bytes``."""
    _, extension = split_extension(upload.filename, extensions, what)
    fd, path = tempfile.mkstemp(suffix=extension, dir=uploads_dir())
    try:
        written = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := upload.file.read(CHUNK):
                written += len(chunk)
                if written > max_bytes:
                    raise HTTPException(413, f"{what} is larger than {max_bytes >> 20} MB (--conf max_upload_mb)")
                out.write(chunk)
    except BaseException:
        os.unlink(path)
        raise
    return path


def _removing(stack: ExitStack, path: str) -> str:
    stack.callback(lambda: os.path.exists(path) and os.unlink(path))
    return path


class InferSlots:
    """At most MONAI_LABEL_INFER_CONCURRENCY inferences at once (1 when unset: a CPU runs one well); a request
    that waits longer than MONAI_LABEL_INFER_TIMEOUT seconds for its turn gets a 503."""

    def __init__(self, concurrency: int, timeout: float):
        self.slots = threading.BoundedSemaphore(max(1, concurrency))
        self.timeout = timeout

    def __enter__(self):
        if not self.slots.acquire(timeout=self.timeout):
            raise HTTPException(503, f"the server is busy with other inferences (waited {self.timeout:g} s): retry")

    def __exit__(self, *exc):
        self.slots.release()


def guarded_routes(settings: AppSettings):
    """The checked replacements, as (method, path, endpoint). Plain ``def``: FastAPI runs them in worker threads."""
    max_bytes = settings.max_upload_mb << 20
    slots = InferSlots(server_settings.MONAI_LABEL_INFER_CONCURRENCY, server_settings.MONAI_LABEL_INFER_TIMEOUT)

    def infer(background_tasks: BackgroundTasks, model: str, image: str = "", session_id: str = "",
              params: str = Form("{}"), file: UploadFile = File(None), label: UploadFile = File(None),
              output: Optional[infer_endpoint.ResultType] = None, user: User = Depends(RBAC(ROLE_USER))):
        if session_id:
            raise bad_request("sessions are not used here: give a datastore id (?image=ID) or upload the image")
        if label is not None:
            raise bad_request("this model takes no label input")
        request = check_infer_params(parse_params(params))
        instance = app_instance()
        with ExitStack() as cleanup:
            if file is not None:
                source = _removing(cleanup, receive_upload(file, IMAGE_EXTENSIONS, max_bytes, "uploaded image"))
            elif image:
                source = image  # TextDiffApp.infer takes datastore ids only
            else:
                raise bad_request("give a datastore image id (?image=ID) or upload an image file")
            config = instance.info().get("config", {}).get("infer", {})
            with slots:
                try:
                    result = instance.infer({**config, **request, "model": model, "image": source})
                finally:
                    # with heap tuning the freed maps stay with the process: give them back after every request
                    release_free_heap()
            return infer_endpoint.send_response(instance.datastore(), result, output, background_tasks)

    def add_image(image: Optional[str] = None, params: str = Form("{}"), file: UploadFile = File(...),
                  user: User = Depends(RBAC(ROLE_ANNOTATOR))):
        stem, _ = split_extension(file.filename, IMAGE_EXTENSIONS, "uploaded image")
        image_id = image or stem  # checked by the datastore, as every id and tag
        info = parse_params(params)
        with ExitStack() as cleanup:
            path = _removing(cleanup, receive_upload(file, IMAGE_EXTENSIONS, max_bytes, "uploaded image"))
            return {"image": app_instance().datastore().add_image(image_id, path, info | {"user": user.username})}

    def save_label(image: str, params: str = Form("{}"), tag: str = "final", label: UploadFile = File(...),
                   user: User = Depends(RBAC(ROLE_ANNOTATOR))):
        info = parse_params(params)
        instance = app_instance()
        with ExitStack() as cleanup:
            path = _removing(cleanup, receive_upload(label, LABEL_EXTENSIONS, max_bytes, "uploaded label"))
            label_id = instance.datastore().save_label(image, path, tag or "final", info | {"user": user.username})
        return (instance.on_save_label(image, label_id) or {}) | {"image": image, "label": label_id}

    def stop_training(user: User = Depends(RBAC(ROLE_ADMIN))):
        """Ask the running training to end after its current epoch (it then publishes its best head); what still
        runs after ``STOP_GRACE_S`` is killed, as MONAI Label does."""
        running, _ = train_endpoint.AsyncTask.status("train", check_if_running=True)
        trainer = app_instance()._trainers.get("textdiff")
        if trainer is None or not running or running.get("request", {}).get("model") != "textdiff":
            return train_endpoint.stop()  # nothing to ask (pretraining checkpoints and resumes by itself)
        trainer.stop_file.parent.mkdir(parents=True, exist_ok=True)
        trainer.stop_file.touch()
        deadline = time.time() + STOP_GRACE_S
        while time.time() < deadline and _training_runs():
            time.sleep(0.5)
        return train_endpoint.stop() if _training_runs() else {"status": "stopped after its epoch"}

    def refused():
        raise HTTPException(403, "this server does not offer this route")

    return ([("POST", "/infer/{model}", infer), ("PUT", "/datastore/image", add_image),
             ("PUT", "/datastore/", add_image), ("PUT", "/datastore/label", save_label),
             ("DELETE", "/train/", stop_training)]
            + [(method, path, refused) for method, path in REFUSED_ROUTES])


def install(fastapi_app, settings: AppSettings, loopback_clients_only: bool = False) -> None:
    """Replace the routes (idempotent: an app rebuilt by /reload installs again over its own), set the CORS policy,
    and with ``loopback_clients_only`` answer other machines with a 403."""
    prefix = server_settings.MONAI_LABEL_API_STR
    for method, path, endpoint in guarded_routes(settings):
        full = prefix + path
        fastapi_app.router.routes[:] = [r for r in fastapi_app.router.routes
                                        if not (isinstance(r, APIRoute) and r.path == full and method in r.methods)]
        fastapi_app.router.add_api_route(full, endpoint, methods=[method], include_in_schema=False)
        # first: matched before anything MONAI Label registers later under a wider pattern
        fastapi_app.router.routes.insert(0, fastapi_app.router.routes.pop())
    set_cors(fastapi_app, settings.cors_origins)
    outer = fastapi_app.middleware_stack  # the outermost error handler; the wrapper goes inside it, before CORS
    if outer is not None:
        if isinstance(outer.app, LoopbackClientsOnly):
            outer.app = outer.app.app
        if loopback_clients_only:
            outer.app = LoopbackClientsOnly(outer.app)


def set_cors(fastapi_app, origins: tuple[str, ...]) -> None:
    """Only ``origins`` may call from a browser (no credentials mode, no wildcard); none by default."""
    options = dict(allow_origins=list(origins), allow_credentials=False, allow_methods=["GET", "POST", "PUT", "DELETE"],
                   allow_headers=["Authorization", "Content-Type"])
    node = fastapi_app.middleware_stack  # built on the first ASGI call (the lifespan, before the app exists)
    while node is not None:
        inner = getattr(node, "app", None)
        if isinstance(inner, CORSMiddleware):
            node.app = CORSMiddleware(inner.app, **options)
            return
        node = inner
    for middleware in fastapi_app.user_middleware:  # not built yet: change what will be built
        if middleware.cls is CORSMiddleware:
            middleware.kwargs.update(options)
            return
    fastapi_app.add_middleware(CORSMiddleware, **options)

