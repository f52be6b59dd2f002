"""The inspection service (``patchcore serve``): a FastAPI app with a web page over one model file.

``service`` holds the model, micro-batched scoring, feedback and reloads (no HTTP); ``app`` the endpoints;
``metrics`` the Prometheus text; ``static/`` the page (plain HTML, CSS and JavaScript, shipped as package
data, no build step and nothing fetched from elsewhere). FastAPI and uvicorn come with the extra
``patchcore[serve]`` and are imported only here, never by ``import patchcore``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from typing import Any

from ..errors import PatchCoreError

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_extra() -> None:
    """Refuse in one line when the serve extra is not installed."""
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise PatchCoreError(
            f"patchcore serve needs the serve extra ({exc.name} is missing): pip install 'patchcore[serve]'"
        ) from None


def serve(
    model: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_upload_mb: float = 20.0,
    data_roots: Sequence[str | os.PathLike] = (),
    runtime: dict[str, Any] | None = None,
) -> int:
    """Load ``model`` (a bad file raises PatchCoreError before anything listens) and serve it until stopped."""
    require_extra()
    import uvicorn

    from .app import create_app
    from .service import Service

    if not is_loopback(host) and not token:
        logger.warning(
            "serving on %s without a token: anyone who reaches this address can change the model "
            "(set --token or PATCHCORE_TOKEN)",
            host,
        )
    service = Service(model, runtime=runtime, data_roots=data_roots)
    app = create_app(service, token=token, max_upload_mb=max_upload_mb)
    logger.info("serving %s (model %s) at http://%s:%d/", model, service.served.model_id[:12], host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        service.close()
    return 0
