"""``predict`` and ``fit`` on Ray: a cluster (``address="auto"`` or ``"ray://host:port"``) or Ray local.

Predict is a Ray Data pipeline: the image list, then ``map_batches`` over a pool of actors
(:class:`RayScorer`), each of which builds the detector once from the model file's bytes, put once into the
object store by the driver (workers need not see the model's path), and per batch reads and decodes the
images (:func:`read_batch`) and scores them. The driver consumes the
results in input order as they stream in and writes the local engine's OUT layout with the same helpers
(:mod:`patchcore.reporting.results`, :class:`~patchcore.reporting.overlays.OverlayWriter`), holding a bounded
window of results: Ray Data's backpressure keeps a few blocks in flight, whatever the number of images.
Workers read the images by path, so the inputs must be visible at the same path on every node (a shared
file system), as for any Ray Data file source.

Fit shards the bank images (:meth:`~patchcore.detectors.base.Detector.calibration_split`) into contiguous
chunks; a Ray task per shard extracts its features and keeps a greedy coreset
(:meth:`~patchcore.detectors.base.Detector.fit_shard`, returned as model-file bytes); the driver runs the
greedy over their union and calibrates (:meth:`~patchcore.detectors.base.Detector.merge_shards`). The result
depends on the seed and the number of shards only, not on the workers or the order in which shards finish.

Worker failures: an actor that dies is restarted and its batch retried (``MAX_RETRIES`` times), a shard task
likewise; the output is then the same as without the failure.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..detectors import Detector, loads
from ..errors import PatchCoreError
from ..imaging import ImageLike, load_image
from ..reporting.files import with_extension, write_npy
from ..reporting.overlays import OverlayWriter, RunRange, render_pictures
from ..reporting.results import error_row, map_path, original_map, scored_row, write_results

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'patchcore[ray]'"
MAX_RETRIES = 3  # restarts of a dead actor and retries of its batch (or of a shard task)
WINDOW = 10_000  # images per Ray Data run of predict: Ray Data keeps state per block on the driver until a run ends


def import_ray() -> Any:
    """The ray module, or an error saying how to install it."""
    try:
        import ray
        import ray.data  # Ray Data: in the same wheel, with the dependencies of the extra ray[data]
    except ImportError as exc:
        raise PatchCoreError(f"--engine ray needs Ray ({exc}): {INSTALL_HINT}") from None
    return ray


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, initialised for the duration: local on this machine's CPUs (``num_cpus`` to use fewer) when
    ``address`` is None, else joined to the cluster at ``address`` (``auto``: the one ``ray start`` runs here;
    ``ray://host:port``: a remote head through Ray Client). A session already initialised by the caller (a
    notebook, the tests) is used as it is and left running."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError... for a bad address
        where = f"the Ray cluster at {address}" if address else "Ray locally"
        raise PatchCoreError(
            f"cannot start {where} ({' '.join(str(exc).split())[:300]}): check --ray-address "
            "(auto, or ray://HOST:10001), or start a cluster with 'ray start --head'"
        ) from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_cpus(ray: Any) -> int:
    """The CPUs of the Ray cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# ---------------------------------------------------------------------------------------------- predict
class RayScorer:
    """The actor of the predict pipeline: builds the detector once from the model bytes (an object
    reference, fetched from the object store), then reads, decodes and scores batches of image paths.

    Output columns per image: ``index``, ``score`` (NaN for an unreadable image), ``error`` (UTF-8 bytes,
    empty when read), and as asked ``map`` (the float32 map at the original size), ``overlay``/``mask`` (PNG
    bytes, when the colour range is fixed by the thresholds) or ``pending`` (the input map and
    geometry, when the range is the run's and the driver draws the pictures at the end, as the local
    engine does).
    """

    def __init__(self, model: Any, runtime: dict[str, Any], maps: bool, overlays: bool) -> None:
        import ray

        data = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        # the driver verified the file (checksum and, with a key, its signature); the checksum is checked again
        self.detector = loads(data, source="the model sent by the driver", verify_signature=False, **runtime)
        self.maps = maps
        self.overlays = overlays
        self.range = RunRange(self.detector.thresholds_, self.detector.score_scale).fixed if overlays else None
        self.pixel_threshold = self.detector.thresholds_.pixel
        self.max_pixels = runtime.get("max_pixels")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = read_batch(batch, self.max_pixels)
        index, pixels, errors = decoded["index"], decoded["pixels"], decoded["error"]
        n = len(index)
        scores = np.full(n, np.nan)
        maps = _objects(n, np.zeros((0, 0), np.float32)) if self.maps else None
        overlay = _objects(n, b"") if self.overlays and self.range is not None else None
        mask = _objects(n, b"") if overlay is not None else None
        pending = _objects(n, None) if self.overlays and self.range is None else None
        readable = [j for j in range(n) if not errors[j]]
        images = [np.asarray(pixels[j], dtype=np.float32) for j in readable]
        results = self.detector.infer(images, maps=self.maps or self.overlays)
        for j, image, result in zip(readable, images, results):
            scores[j] = result.score
            if maps is not None:
                maps[j] = original_map(result.map(), result.geometry)
            if overlay is not None and mask is not None and self.range is not None:
                drawn = render_pictures(image, result.map(), result.geometry, self.range, self.pixel_threshold)
                overlay[j], mask[j] = drawn[0], drawn[1] or b""
            if pending is not None:
                pending[j] = (result.map(), result.geometry)  # the driver keeps it as float16, as locally
        out = {"index": index, "score": scores, "error": errors}
        out |= {
            name: column for name, column in (("map", maps), ("overlay", overlay), ("mask", mask)) if column is not None
        }
        if pending is not None:
            out["pending"] = pending
        return out


def _objects(n: int, fill: Any) -> np.ndarray:
    column = np.empty(n, dtype=object)
    for j in range(n):
        column[j] = fill
    return column


def read_batch(batch: dict[str, np.ndarray], max_pixels: int | None) -> dict[str, np.ndarray]:
    """Read and decode a batch of image files (paths as bytes): pixels, or the error as UTF-8 bytes."""
    n = len(batch["index"])
    pixels = _objects(n, np.zeros((0, 0, 3), np.float32))
    errors = _objects(n, b"")
    for j, raw in enumerate(batch["path"]):
        try:
            pixels[j] = load_image(os.fsdecode(bytes(raw)), max_pixels)
        except PatchCoreError as exc:
            errors[j] = str(exc).encode("utf-8", "surrogateescape")
    return {"index": batch["index"], "pixels": pixels, "error": errors}


def predict(
    detector: Detector,
    model_bytes: bytes,
    inputs: Sequence[Path],
    names: Sequence[Path],
    out: Path,
    keys: Sequence[str],
    *,
    runtime: dict[str, Any],
    maps: bool = False,
    overlays: bool = False,
    address: str | None = None,
    num_workers: int | None = None,
    on_error: Callable[[str], None] = logger.error,
    scorer: type[RayScorer] = RayScorer,
    window: int = WINDOW,
) -> tuple[int, int]:
    """Score ``inputs`` on Ray and write ``out`` as the local engine does. Returns (rows written, unreadable).

    ``detector`` is the model as loaded here (it decides thresholds and colours), ``model_bytes`` its file's
    bytes (what the workers load); ``names`` the inputs' output names (:func:`~patchcore.reporting.files.
    output_names`); ``keys`` the result columns; ``runtime`` the detector's runtime settings on the workers;
    ``num_workers`` the actors (default: the cluster's CPUs); ``on_error`` gets one message per unreadable
    image; ``scorer`` the actor class (a subclass, e.g. to inject faults in tests); ``window`` the images per
    Ray Data run (runs follow one another; each starts its own actors, which load the model again from the
    object store), so that Ray Data's bookkeeping on the driver stays bounded.
    """
    from tqdm.auto import tqdm

    batch_size = detector.resolved_batch_size()
    with ray_session(address) as ray:
        from ray.data.context import DataContext

        context = DataContext.get_current()
        context.execution_options.preserve_order = True  # rows come back in input order
        context.enable_progress_bars = False  # one bar below, in images
        workers = num_workers or cluster_cpus(ray)
        model = ray.put(model_bytes)

        def pipeline(start: int, stop: int) -> Any:
            """The Ray Data run over inputs[start:stop]."""
            items = [{"index": i, "path": os.fsencode(inputs[i])} for i in range(start, stop)]
            blocks = min(len(items), max(workers, math.ceil(len(items) / batch_size)))  # every worker gets work
            dataset = ray.data.from_items(items, override_num_blocks=max(1, blocks))
            # each actor reads and decodes its batch, then scores it: decoded pixels never cross the object store,
            # and no read task waits for a CPU that the actors hold
            return dataset.map_batches(
                scorer,
                fn_constructor_kwargs={"model": model, "runtime": runtime, "maps": maps, "overlays": overlays},
                compute=ray.data.ActorPoolStrategy(size=workers),
                batch_size=batch_size,
                batch_format="numpy",
                num_cpus=1,
                max_restarts=MAX_RETRIES,
                max_task_retries=MAX_RETRIES,
            )

        pictures = OverlayWriter(out, detector.thresholds_, detector.score_scale) if overlays else None
        failed = 0
        bar = tqdm(total=len(inputs), desc="scoring on Ray", unit="img", disable=None, leave=False)

        def rows() -> Iterator[dict[str, Any]]:
            nonlocal failed
            expected = 0
            batches = (
                batch
                for start in range(0, len(inputs), window)
                for batch in pipeline(start, min(len(inputs), start + window)).iter_batches(
                    batch_size=None, batch_format="numpy"
                )
            )
            for batch in batches:
                for j, i in enumerate(batch["index"]):
                    i = int(i)
                    if i != expected:  # never: preserve_order holds; a wrong file would be worse than a stop
                        raise PatchCoreError(f"the Ray pipeline returned image {i} where {expected} was due")
                    expected += 1
                    path, name = inputs[i], names[i]
                    error = bytes(batch["error"][j]).decode("utf-8", "surrogateescape")
                    if error:
                        failed += 1
                        on_error(error)
                        yield error_row(path, error)
                        continue
                    score = float(batch["score"][j])
                    if maps:
                        write_npy(map_path(out, name), batch["map"][j])
                    if pictures is not None and "overlay" in batch:
                        pictures.put(
                            with_extension(name, ".png"), bytes(batch["overlay"][j]), bytes(batch["mask"][j]) or None
                        )
                    elif pictures is not None:
                        amap, geometry = batch["pending"][j]
                        pictures.add(path, name, amap, geometry, path=path)
                    yield scored_row(path, score, detector)
                bar.update(len(batch["index"]))
            if expected != len(inputs):
                raise PatchCoreError(f"the Ray pipeline returned {expected} of {len(inputs)} images: run it again")

        try:
            written = write_results(out, keys, rows())
        finally:
            bar.close()
        if pictures is not None:
            pictures.finish()
    return written, failed


# ---------------------------------------------------------------------------------------------- fit
def _fit_shard(detector: Detector, images: list[ImageLike], n_shards: int) -> list[bytes]:
    return detector.fit_shard(images, n_shards)


def fit(
    detector: Detector,
    images: Sequence[ImageLike],
    *,
    shards: int | None = None,
    address: str | None = None,
    num_workers: int | None = None,
    shard_task: Callable[[Detector, list[ImageLike], int], list[bytes]] = _fit_shard,
) -> Detector:
    """Fit ``detector`` (unfitted) on ``images`` on Ray: ``shards`` contiguous shards of the bank images
    (default: ``num_workers``, itself by default the cluster's CPUs), at most ``num_workers`` at a time, each
    a task that extracts its features and keeps a greedy coreset; then the greedy over their union and the
    calibration here. Deterministic for the seed and the number of shards. Returns the fitted detector."""
    from tqdm.auto import tqdm

    images = list(images)
    if not images:
        raise PatchCoreError("no training images: fit needs at least one good image")
    started = time.perf_counter()
    train, calibration = detector.calibration_split(images)
    with ray_session(address) as ray:
        workers = num_workers or cluster_cpus(ray)
        n_shards = max(1, min(shards or workers, len(train)))
        chunks = [list(chunk) for chunk in _split(train, n_shards)]
        task = ray.remote(shard_task).options(num_cpus=1, max_retries=MAX_RETRIES)
        refs: dict[Any, int] = {}
        parts: list[list[bytes] | None] = [None] * n_shards
        bar = tqdm(total=len(train), desc=f"fitting {n_shards} shards on Ray", unit="img", disable=None, leave=False)
        try:
            waiting = list(range(n_shards))
            while waiting or refs:
                while waiting and len(refs) < workers:
                    k = waiting.pop(0)
                    refs[task.remote(detector, chunks[k], n_shards)] = k
                done, _ = ray.wait(list(refs), num_returns=1)
                k = refs.pop(done[0])
                parts[k] = ray.get(done[0])
                bar.update(len(chunks[k]))
        finally:
            bar.close()
    shard_seconds = time.perf_counter() - started
    detector.merge_shards([part for part in parts if part is not None], calibration)
    detector.fit_stats_ = {
        **detector.fit_stats_,
        "shard_seconds": shard_seconds,
        "fit_seconds": time.perf_counter() - started,
    }
    return detector


def _split(items: list[ImageLike], n: int) -> list[list[ImageLike]]:
    """``n`` contiguous chunks whose sizes differ by at most one (the first ones larger)."""
    size, extra = divmod(len(items), n)
    bounds = np.cumsum([0] + [size + (k < extra) for k in range(n)])
    return [items[bounds[k] : bounds[k + 1]] for k in range(n)]
