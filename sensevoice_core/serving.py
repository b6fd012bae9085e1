"""What every serving process does with a model: load it ready to serve (cache, warm-up, and
a reload's canary) and answer one TranscribeRequest with it. The single-host worker
(inference_worker.worker) and the cluster's replicas (cluster.replica) both go through here."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sensevoice_core.batching import ForwardBatcher
from sensevoice_core.cache import LoadReport, load_sensevoice_cached
from sensevoice_core.canary import CanaryReport
from sensevoice_core.errors import REQUEST_AUDIO, AudioError, AudioTooLongError
from sensevoice_core.long_audio import ProgressCallback
from sensevoice_core.path_cache import PathCache
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.protocol import ErrorReply, ModelInfo, TranscribeReply, TranscribeRequest
from sensevoice_core.settings import Settings
from sensevoice_core.warmup import check_canary, describe_failure, warm_up

logger = logging.getLogger("sensevoice.serving")


class LoadFailure(Exception):
    """A model that must not serve: the failed stage and its cause in one line
    (describe_failure), and the canary's report when that is what failed."""

    def __init__(self, cause: str, canary: CanaryReport | None = None):
        super().__init__(cause)
        self.cause = cause
        self.canary = canary


@dataclass
class Loaded:
    model: SenseVoice
    report: LoadReport
    info: ModelInfo  # what status and replies say about it


def model_info(report: LoadReport, warmup_s: float, settings: Settings) -> ModelInfo:
    # The identities L3 holds for exactly these checksums: what the supervisor's L1 check
    # compares stats with (read here, once per load, not on the supervisor's loop).
    identities = PathCache(settings.cache_dir).identities(str(report.model_dir),
                                                          report.file_sha256)
    return ModelInfo(model_dir=str(report.model_dir), layout=report.layout,
                     fingerprint=report.fingerprint, short_ids=report.short_ids,
                     file_sha256=report.file_sha256, file_paths=report.file_paths,
                     file_identities=identities,
                     cache_level=report.level, load_s=report.total_s,
                     steps_s=report.steps_s, warmup_s=warmup_s, warnings=report.warnings,
                     compute_type=report.compute_type, compute_reason=report.compute_reason)


def load_for_serving(path: str | Path | None, force_fresh: bool, settings: Settings,
                     canary: bool) -> Loaded:
    """Load through the cache (L2 first), warm up, and (canary=True: a reload's green) pass
    SENSEVOICE_RELOAD_CANARY_DIR's clips; LoadFailure naming the stage otherwise."""
    stage = "load"
    try:
        model, report = load_sensevoice_cached(path, force_fresh, settings)
        stage = "warm-up"
        warmup_s = warm_up(model)
        stage = "canary"
        passed = check_canary(model, settings) if canary else None
    except Exception as e:  # noqa: BLE001 - any failure to load means "not ready"
        raise LoadFailure(describe_failure(stage, e)) from e
    if passed is not None and not passed.passed:
        raise LoadFailure(passed.summary(), passed)
    if passed is not None:
        logger.info("%s", passed.summary())
    logger.info("ready after a %.2f s warm-up", warmup_s)
    info = model_info(report, warmup_s, settings).model_copy(update={"canary": passed})
    return Loaded(model, report, info)


def attach_batcher(model: SenseVoice, settings: Settings, threads: int,
                   callers: Callable[[], int]) -> None:
    """Cross-request batching (SENSEVOICE_BATCH_WAIT_MS > 0): concurrent callers' forward
    passes run together on the model's batcher thread. After the warm-up, which runs on one
    thread."""
    if settings.batch_wait_ms > 0:
        model.batcher = ForwardBatcher(
            model.forward_rows, settings.batch_wait_ms / 1000,
            round(settings.max_batch_s / model.frontend.feature_frame_s),
            threads=threads, callers=callers)


def answer(model: SenseVoice, fingerprint: str, request: TranscribeRequest, payload: bytes,
           settings: Settings, progress: ProgressCallback | None = None
           ) -> TranscribeReply | ErrorReply:
    """The request's reply, or the error for this request alone: bad audio, too long, a bad
    option, or an unexpected failure (logged; the process goes on serving)."""
    start = time.perf_counter()
    try:
        if request.audio_format == "pcm_f32le":
            if len(payload) % 4:
                raise AudioError(request.filename or REQUEST_AUDIO,
                                 f"{len(payload)} bytes is not a whole number of float32 "
                                 f"samples (pcm_f32le)")
            audio: bytes | np.ndarray = np.frombuffer(payload, dtype="<f4")
        else:
            audio = payload
        options = settings.transcribe_options(
            request.language, request.use_itn, request.vad_threshold,
            request.word_timestamps, request.languages)
        result = model.transcribe(audio, options, sample_rate=request.sample_rate,
                                  source_name=request.filename, progress=progress)
    except AudioTooLongError as e:
        return ErrorReply(request_id=request.request_id, code="too_long",
                          message=f"{e} (SENSEVOICE_MAX_AUDIO_S)")
    except AudioError as e:
        return ErrorReply(request_id=request.request_id, code="bad_audio", message=str(e))
    except ValueError as e:
        return ErrorReply(request_id=request.request_id, code="bad_request", message=str(e))
    except Exception as e:  # e.g. out of memory: answer, and keep serving the next request
        logger.exception("Request %s failed", request.request_id)
        return ErrorReply(request_id=request.request_id, code="internal",
                          message=f"the worker failed on this request: {type(e).__name__}: "
                                  f"{e}"[:500])
    # dict(result), not model_dump(): the Segments go in as they are, not dumped to dicts
    # and validated again (thousands of them for hours of audio).
    return TranscribeReply(**dict(result), request_id=request.request_id,
                           fingerprint=fingerprint, worker_pid=os.getpid(),
                           inference_s=time.perf_counter() - start)
