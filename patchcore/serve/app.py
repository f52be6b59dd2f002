"""The HTTP face of the service: a FastAPI app over a :class:`~patchcore.serve.service.Service`.

Endpoints (all JSON unless said): ``POST /v1/predict`` (multipart field ``files``; ``?overlay=true`` adds
PNG overlays), ``GET /v1/model``, ``GET /v1/explain?image_id=``, ``POST /v1/feedback``, ``POST /v1/reload``,
``GET /healthz``, ``GET /readyz``, ``GET /metrics`` (Prometheus text) and the page at ``/``. With a token,
feedback and reload need ``Authorization: Bearer TOKEN``. Errors are ``{"error": "..."}`` with the status
that fits: 401, 404, 409, 413 (an upload over the limit), 415 (not an image), 503.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..errors import PatchCoreError
from ..imaging import read_image_bytes
from ..reporting.overlays import RunRange, region_outline, render_overlay, to_png_bytes
from .service import Service, Upload

logger = logging.getLogger(__name__)

MAX_FILES = 64  # images in one request
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.extra = status, extra


def png_base64(array: np.ndarray) -> str:
    return base64.b64encode(to_png_bytes(array)).decode("ascii")


def outline_png(full_map: np.ndarray, threshold: float) -> np.ndarray:
    """The outline of the thresholded region as an RGBA picture (white, transparent elsewhere), drawn with
    the width the overlays use."""
    width = max(1, round(min(full_map.shape) / 256))
    edge = region_outline(full_map >= threshold, width)
    rgba = np.zeros((*full_map.shape, 4), np.uint8)
    rgba[edge] = (255, 255, 255, 255)
    return rgba


def create_app(service: Service, *, token: str | None = None, max_upload_mb: float = 20.0) -> FastAPI:
    """The app serving ``service``; ``token`` guards feedback and reload; uploads over ``max_upload_mb``
    megabytes (per file) are refused with 413."""
    app = FastAPI(title="patchcore", docs_url=None, redoc_url=None, openapi_url=None)
    max_bytes = int(max_upload_mb * 1_000_000)
    page = resources.files(__package__).joinpath("static")
    static = {name: page.joinpath(name).read_bytes() for name in STATIC}
    index = page.joinpath("index.html").read_text(encoding="utf-8")
    metrics = service.metrics

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, exc: HTTPError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": str(exc), **exc.extra}, status_code=exc.status, headers=headers)

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            metrics.request(endpoint, status, time.perf_counter() - started)

    def authorize(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPError(401, "this endpoint needs the service's token: send 'Authorization: Bearer TOKEN'")

    async def read_uploads(request: Request, field: str) -> list[Upload]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes * MAX_FILES + 1_000_000:
            raise HTTPError(413, f"the request is larger than {MAX_FILES} uploads of --max-upload-mb {max_upload_mb:g}")
        try:
            form = await request.form(max_files=MAX_FILES, max_fields=100)
        except Exception as exc:  # a malformed multipart body, or too many parts
            raise HTTPError(400, f"the request is not a readable multipart form ({exc})") from None
        files = [item for item in form.getlist(field) if isinstance(item, UploadFile)]
        if not files:
            raise HTTPError(400, f"no images: send one or more files in the multipart field '{field}'")
        uploads = []
        for item in files:
            name = item.filename or "upload"
            size = item.size if item.size is not None else None
            if size is not None and size > max_bytes:
                raise HTTPError(413, f"{name}: {size:,} bytes is over --max-upload-mb {max_upload_mb:g}", filename=name)
            data = await item.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise HTTPError(413, f"{name}: over --max-upload-mb {max_upload_mb:g}", filename=name)
            try:
                pixels = await run_in_threadpool(read_image_bytes, data, name, service.max_pixels)
            except PatchCoreError as exc:
                raise HTTPError(415, f"{exc}", filename=name) from None
            uploads.append(service.add_upload(name, data, pixels))
        return uploads

    def overlay_fields(served: Any, upload: Upload, result: Any) -> dict[str, Any]:
        thresholds = served.detector.thresholds_
        run_range = RunRange(thresholds, served.detector.score_scale)
        vrange = run_range.fixed
        amap = result.map()
        if vrange is None:  # no thresholds: this image's own range
            low, high = float(np.min(amap)), float(np.max(amap))
            vrange = (low, high if high > low else low + 1.0)
        _, full, overlay = render_overlay(upload.pixels, amap, result.geometry, vrange, thresholds.pixel)
        fields = {"overlay_png": png_base64(overlay), "overlay_range": list(vrange)}
        if thresholds.pixel is not None:
            fields["outline_png"] = png_base64(outline_png(full, thresholds.pixel))
        return fields

    @app.get("/", response_class=HTMLResponse)
    async def home() -> HTMLResponse:
        return HTMLResponse(index)

    @app.get("/static/{name}")
    async def static_file(name: str) -> Response:
        if name not in static:  # a fixed set of packaged files, never a path from the request
            raise HTTPError(404, f"no such file: {name}")
        return Response(static[name], media_type=STATIC[name])

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not service.ready:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True, "model_id": service.served.model_id})

    @app.get("/metrics")
    async def prometheus() -> Response:
        text = metrics.render(service.served.model_id)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        return await run_in_threadpool(service.describe)

    @app.post("/v1/predict")
    async def predict(request: Request, overlay: bool = False) -> dict[str, Any]:
        uploads = await read_uploads(request, "files")
        future = service.scorer.score([u.pixels for u in uploads], maps=overlay)
        try:
            served, results = await asyncio.wrap_future(future)
        except PatchCoreError as exc:  # e.g. an image smaller than the model's crop
            names = ", ".join(u.filename for u in uploads)
            raise HTTPError(422, f"{names}: cannot be scored by this model ({exc})") from None
        out = []
        for upload, result in zip(uploads, results):
            decision = served.detector.decide(result.score)
            metrics.scored(result.score, decision["is_anomalous"], decision["normalized_score"])
            row = {
                "filename": upload.filename,
                "image_id": upload.image_id,
                "score": result.score,
                **decision,
                "width": int(upload.pixels.shape[1]),
                "height": int(upload.pixels.shape[0]),
            }
            if overlay:
                row |= await run_in_threadpool(overlay_fields, served, upload, result)
            out.append(row)
        return {"model_id": served.model_id, "results": out}

    @app.get("/v1/explain")
    async def explain(image_id: str) -> dict[str, Any]:
        upload = service.uploads.get(image_id)
        if upload is None:
            raise HTTPError(404, f"unknown image_id {image_id[:64]!r}: upload the image with POST /v1/predict first")

        def run(served: Any) -> tuple[Any, Any]:
            return served, served.detector.explain(upload.pixels, data_root=service.data_roots)

        try:
            served, explanation = await asyncio.wrap_future(service.scorer.call(run))
        except PatchCoreError as exc:
            raise HTTPError(409, str(exc)) from None
        body = {"model_id": served.model_id, "image_id": image_id, "filename": upload.filename}
        body |= explanation.to_dict()
        body["patch_crop_png"] = png_base64(explanation.patch_crop)
        if explanation.nearest_crop is not None:
            body["nearest_crop_png"] = png_base64(explanation.nearest_crop)
        return body

    @app.post("/v1/feedback", status_code=202)
    async def feedback(request: Request) -> dict[str, Any]:
        authorize(request)
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/"):
            form = await request.form(max_files=1, max_fields=10)
            image_id = form.get("image_id")
            if isinstance(form.get("file"), UploadFile):
                upload: Upload | None = (await read_uploads(request, "file"))[0]
            else:
                upload = service.uploads.get(str(image_id)) if isinstance(image_id, str) else None
        else:
            try:
                body = json.loads(await request.body() or b"{}")
            except ValueError:
                raise HTTPError(400, 'send JSON {"image_id": "..."} or a multipart form') from None
            image_id = body.get("image_id") if isinstance(body, dict) else None
            upload = service.uploads.get(image_id) if isinstance(image_id, str) else None
        if upload is None:
            raise HTTPError(404, "unknown image_id: send the image_id of an image scored by POST /v1/predict")
        stored = await run_in_threadpool(service.add_feedback, upload)
        return {
            "queued": True,
            "image_id": upload.image_id,
            "stored": f"{stored.parent.name}/{stored.name}",
            "model_id": service.served.model_id,
            "pending": service.pending_feedback,
        }

    @app.post("/v1/reload")
    async def reload(request: Request) -> dict[str, Any]:
        authorize(request)
        old = service.served.model_id
        try:
            served, changed = await run_in_threadpool(service.reload)
        except PatchCoreError as exc:
            logger.error("reload refused, still serving %s: %s", old[:12], exc)
            raise HTTPError(409, f"reload refused, still serving model {old}: {exc}", model_id=old) from None
        return {"model_id": served.model_id, "changed": changed, "previous_model_id": old}

    return app
