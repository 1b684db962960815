"""``torchckpt.save``: one training checkpoint, to a local path or a URL.

The objects are captured (:func:`~torchckpt.train.training.capture`), then written by
:func:`~torchckpt.train.training.write_payload` (a local path) or uploaded by the remote store.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from ..storage import files
from ..storage.remote import StorageOptions, is_url
from .fsspec_store import upload
from .training import capture, write_payload

__all__ = ["save"]


def save(path: str, *, model: Any = None, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
         epoch: int | None = None, step: int | None = None, metrics: Mapping[str, Any] | None = None,
         extra: Any = None, stateful: Mapping[str, Any] | None = None, weights_format: str = "pt",
         rng: bool = True, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """Write a training checkpoint atomically and durably; returns its sidecar (sha256, size, step ...).

    ``path`` is a local path or a URL (``s3://bucket/run/ckpt.pt``, ``storage_options`` for its
    filesystem): a URL's files are uploaded whole, the sidecar last (:mod:`.fsspec_store`).

    ``model`` may be wrapped (DataParallel, DDP, torch.compile): the weights are saved with clean
    names. ``optimizer``/``scheduler`` may also be dicts or lists of them. ``stateful`` holds any other
    objects with ``state_dict()``/``load_state_dict()`` (a :class:`~torchckpt.train.sampler.ResumableSampler`,
    an EMA helper ...). RNG states are recorded unless ``rng=False``. With
    ``weights_format="safetensors"`` the weights go to ``<path>.safetensors`` beside the training state.
    """
    path = os.fspath(path)
    # missing parent directories are created (as torch.save users expect of "checkpoint/x.pt"), durably
    files.makedirs(path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(os.path.abspath(path)),
                   storage_options)
    payload = capture(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, epoch=epoch, step=step,
                      metrics=metrics, extra=extra, stateful=stateful, rng=rng)
    if is_url(path):
        return upload(path, payload, weights_format, storage_options)
    return write_payload(path, payload, weights_format)
