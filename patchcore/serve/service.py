"""The inspection service without HTTP: the model being served, micro-batched scoring, operator feedback
(incremental fit in the background, saved atomically, swapped in) and reloads.

One worker thread (:class:`Scorer`) owns every use of the served detector: requests that arrive while it
scores are gathered into the next batch (micro-batching), so concurrent clients share backbone passes, and
a detector (whose search buffers are reused between calls) is never used by two threads at once. Feedback
updates a *copy* of the served detector in another thread; until the copy is saved and swapped in, the old
model answers. Nothing here ever opens a path named in a request: uploads are bytes, kept in a bounded
cache under the SHA-256 of their content, and feedback images are written under names made here.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..detectors import Detector, Inference, load
from ..errors import PatchCoreError
from ..persistence import atomic_write, read_state
from .metrics import Metrics

logger = logging.getLogger(__name__)

FEEDBACK_SUFFIX = ".feedback"  # feedback images live in MODEL.feedback/ beside the model file
BACKUP_SUFFIX = ".bak"  # the model file before the last feedback update
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "MPO": ".jpg"}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex: a model's id."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: str | os.PathLike, runtime: dict[str, Any]) -> tuple[Detector, str]:
    """(detector, model id) of a model file, the id hashed from the very bytes that were loaded (a file
    replaced during the read is read again)."""
    for _ in range(3):
        before = file_sha256(path) if Path(path).is_file() else None
        detector = load(path, **runtime)
        if before is not None and file_sha256(path) == before:
            return detector, before
    raise PatchCoreError(f"{path}: the file kept changing while it was read: try again when it is written")


@dataclass(frozen=True)
class Served:
    """The detector that answers now, its model id and how many feedback updates this service applied."""

    detector: Detector
    model_id: str
    updates: int


@dataclass(frozen=True)
class Upload:
    """An uploaded image: its id (SHA-256 of the bytes), the client's file name (a label only), bytes, pixels."""

    image_id: str
    filename: str
    data: bytes
    pixels: np.ndarray


class UploadCache:
    """The most recent uploads, bounded in count and bytes (feedback and explanations refer to them by id)."""

    def __init__(self, max_items: int = 256, max_bytes: int = 512 * 2**20) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, Upload] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, upload: Upload) -> None:
        with self._lock:
            if upload.image_id in self._items:
                self._items.move_to_end(upload.image_id)
                return
            self._items[upload.image_id] = upload
            self._bytes += upload.pixels.nbytes + len(upload.data)
            while len(self._items) > self.max_items or (self._bytes > self.max_bytes and len(self._items) > 1):
                _, old = self._items.popitem(last=False)
                self._bytes -= old.pixels.nbytes + len(old.data)

    def get(self, image_id: str) -> Upload | None:
        with self._lock:
            return self._items.get(image_id)


@dataclass
class _Job:
    images: list[np.ndarray] | None  # None: a call
    maps: bool
    call: Callable[[Served], Any] | None
    future: concurrent.futures.Future


class Scorer:
    """The one thread that uses the served detector: scores queued images in micro-batches (everything
    queued while the previous batch ran, up to ``max_batch`` images) and runs other calls in turn."""

    def __init__(self, current: Callable[[], Served], max_batch: int) -> None:
        self.current = current
        self.max_batch = max_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="patchcore-scorer", daemon=True)
        self._thread.start()

    def score(self, images: list[np.ndarray], maps: bool) -> concurrent.futures.Future:
        """A future of (Served, [Inference per image]): the results and the model that computed them."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(images, maps, None, future))
        return future

    def call(self, function: Callable[[Served], Any]) -> concurrent.futures.Future:
        """A future of ``function(served)``, run on the scoring thread."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(None, False, function, future))
        return future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        pending: _Job | None = None
        while True:
            job = pending if pending is not None else self._queue.get()
            pending = None
            if job is None:
                return
            if job.call is not None:
                self._call(job)
                continue
            batch, count = [job], len(job.images or [])
            while count < self.max_batch:  # gather what arrived meanwhile: one backbone pass for all
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                if more.call is not None or count + len(more.images or []) > self.max_batch:
                    pending = more
                    break
                batch.append(more)
                count += len(more.images or [])
            self._score(batch)

    def _call(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel() or job.call is None:
            return
        try:
            job.future.set_result(job.call(self.current()))
        except BaseException as exc:  # the caller gets the error, the thread lives on
            job.future.set_exception(exc)

    def _score(self, batch: list[_Job]) -> None:
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not batch:
            return
        served = self.current()

        def infer(jobs: list[_Job]) -> list[Inference]:
            images = [image for job in jobs for image in job.images or []]
            return list(served.detector.infer(images, maps=any(job.maps for job in jobs)))

        try:
            results = infer(batch)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            for job in batch:  # one request's images must not fail the others: each on its own
                try:
                    job.future.set_result((served, infer([job])))
                except Exception as own:
                    job.future.set_exception(own)
            return
        start = 0
        for job in batch:
            n = len(job.images or [])
            job.future.set_result((served, results[start : start + n]))
            start += n


class Service:
    """The model file being served, and everything that changes it.

    ``runtime``: the detector's runtime settings (device, batch_size, search, max_pixels); ``data_roots``:
    folders where training images are looked up for explanations (the model's folder, which holds the
    feedback images, is always searched last).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        runtime: dict[str, Any] | None = None,
        data_roots: Sequence[str | os.PathLike] = (),
        metrics: Metrics | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.runtime = dict(runtime or {})
        self.max_pixels = self.runtime.get("max_pixels")
        self.metrics = metrics or Metrics()
        self.uploads = UploadCache()
        detector, model_id = load_model(self.model_path, self.runtime)
        self._served = Served(detector, model_id, 0)
        self._meta_cache: tuple[str, dict[str, Any]] | None = None
        self._swap_lock = threading.Lock()  # one model change at a time: feedback update or reload
        self.data_roots = [Path(root) for root in data_roots] + [self.model_path.parent]
        self.scorer = Scorer(lambda: self._served, detector.resolved_batch_size())
        self._feedback: queue.Queue[Path | None] = queue.Queue()
        self.pending_feedback = 0
        self.last_update_error: str | None = None
        self._pending_lock = threading.Lock()
        self._updater = threading.Thread(target=self._update_loop, name="patchcore-feedback", daemon=True)
        self._updater.start()

    # ------------------------------------------------------------------ state
    @property
    def served(self) -> Served:
        return self._served

    @property
    def ready(self) -> bool:
        """A model is loaded and the scoring thread runs."""
        return self.scorer.alive

    def close(self) -> None:
        self._feedback.put(None)
        self._updater.join(timeout=120)
        self.scorer.stop()

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/model`` returns."""
        served = self._served
        detector = served.detector
        cached = self._meta_cache
        if cached is None or cached[0] != served.model_id:  # get_state copies the bank: once per model
            cached = self._meta_cache = (served.model_id, detector.get_state().meta)
        state_meta = cached[1]
        members = getattr(detector, "models_", [detector])
        paths = [p for m in members for p in (getattr(m, "train_paths_", None) or [])]
        feedback_folder = self.feedback_folder.name + "/"
        return {
            "model_id": served.model_id,
            "model_file": self.model_path.name,
            "kind": detector.kind,
            "config": detector.describe(),
            "backbone": [m.config.backbone for m in members],
            "provenance": getattr(detector, "provenance_", {}),
            "train": state_meta.get("train") or state_meta.get("ensemble"),
            "thresholds": detector.thresholds_.to_dict(),
            "score_scale": detector.score_scale,
            "memory_bank_size": detector.memory_bank_size,
            "n_train": detector.n_train_,
            "feedback_updates": served.updates,
            "feedback_images": sum(1 for p in paths if p is not None and p.startswith(feedback_folder))
            // max(1, len(members)),
            "feedback_pending": self.pending_feedback,
            "last_update_error": self.last_update_error,
            "explanations": all(getattr(m, "bank_source_", None) is not None for m in members) and len(members) == 1,
        }

    # ------------------------------------------------------------------ uploads
    def add_upload(self, filename: str, data: bytes, pixels: np.ndarray) -> Upload:
        upload = Upload(hashlib.sha256(data).hexdigest(), filename, data, pixels)
        self.uploads.add(upload)
        return upload

    # ------------------------------------------------------------------ feedback
    @property
    def feedback_folder(self) -> Path:
        return self.model_path.with_name(self.model_path.name + FEEDBACK_SUFFIX)

    def add_feedback(self, upload: Upload) -> Path:
        """Store an image the operator marked good beside the model and queue the update; returns its file."""
        with Image.open(io.BytesIO(upload.data)) as image:
            suffix = FORMATS.get(str(image.format), ".png")
        target = self.feedback_folder / f"{upload.image_id[:32]}{suffix}"
        if not target.exists():
            data = upload.data
            atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
        with self._pending_lock:
            self.pending_feedback += 1
        self._feedback.put(target)
        return target

    def _update_loop(self) -> None:
        while True:
            first = self._feedback.get()
            if first is None:
                return
            paths = [first]
            while True:  # everything marked meanwhile goes into the same update
                try:
                    more = self._feedback.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._feedback.put(None)
                    break
                paths.append(more)
            try:
                self._apply_feedback(list(dict.fromkeys(paths)))
                self.last_update_error = None
                self.metrics.update(True)
            except Exception as exc:  # reported in GET /v1/model and the log; the old model keeps serving
                self.last_update_error = str(exc)
                self.metrics.update(False)
                logger.error("feedback update failed, the model is unchanged: %s", exc)
            finally:
                with self._pending_lock:
                    self.pending_feedback -= len(paths)

    def _apply_feedback(self, images: list[Path]) -> None:
        with self._swap_lock:
            served = self._served
            started = time.perf_counter()
            state = served.detector.get_state()
            updated = type(served.detector).from_state(state, source=self.model_path, **self.runtime)
            updated.partial_fit([str(p) for p in images], root=self.model_path.parent)
            self._backup()
            updated.save(self.model_path)
            model_id = file_sha256(self.model_path)
            self._served = Served(updated, model_id, served.updates + 1)
            logger.info(
                "feedback: added %d image(s) in %.1f s; model %s -> %s",
                len(images),
                time.perf_counter() - started,
                served.model_id[:12],
                model_id[:12],
            )

    def _backup(self) -> None:
        """Keep the model file as it is now in MODEL.bak (written atomically: a whole copy or the old one)."""
        if self.model_path.is_file():
            data = self.model_path.read_bytes()
            backup = self.model_path.with_name(self.model_path.name + BACKUP_SUFFIX)
            atomic_write(backup, lambda tmp: Path(tmp).write_bytes(data))

    # ------------------------------------------------------------------ reload
    def reload(self) -> tuple[Served, bool]:
        """Read MODEL again; a file that does not load raises PatchCoreError and the old model keeps serving.
        Returns (what serves now, whether the model changed)."""
        with self._swap_lock:
            read_state(self.model_path)  # a cheap first check: header, checksum, signature
            detector, model_id = load_model(self.model_path, self.runtime)
            old = self._served
            if model_id != old.model_id:
                self._served = Served(detector, model_id, old.updates)
            return self._served, model_id != old.model_id
