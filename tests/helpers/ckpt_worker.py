"""Checkpointer runs in their own process, for the fault tests (real limits, real kills, real locks).

    python ckpt_worker.py diskfull DIR [FSIZE]  # small save, then big saves that cannot fit; JSON per outcome
    python ckpt_worker.py hold DIR              # save steps 1-3, print "ready", save 4 after a line on stdin
    python ckpt_worker.py kill-at WHERE DIR     # save steps 1-3 (keep_last=1); SIGKILL itself at WHERE in step 3
    python ckpt_worker.py overwrite-kill PATH [WHERE]  # torchckpt.save PATH (bias 1), then again (bias 2), killed at
                                                # WHERE (default: between the data's rename and the sidecar's)
    python ckpt_worker.py new-kill PATH WHERE   # torchckpt.save PATH (bias 1, no file there yet), killed at WHERE
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

import torchckpt


def _outcome(fn) -> dict:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects what escaped
        return {"type": type(exc).__name__, "message": str(exc),
                "is_write_error": isinstance(exc, torchckpt.CheckpointWriteError)}
    return {"type": None}


def diskfull(directory: str, fsize: str | None) -> None:
    if fsize:  # no small file system to mount: the process's file-size limit is the real fault instead
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(fsize), int(fsize)))
    torch.manual_seed(0)
    small, big = torch.nn.Linear(16, 16), torch.nn.Linear(1024, 1024)  # ~1 KiB and 4 MiB of tensors
    ckpt = torchckpt.Checkpointer(os.path.join(directory, "run"), keep_last=1)
    ckpt.save(1, model=small)
    results = {"checkpointer": _outcome(lambda: ckpt.save(2, model=big)),
               "save": _outcome(lambda: torchckpt.save(os.path.join(directory, "single.pt"), model=big))}
    with torchckpt.Checkpointer(os.path.join(directory, "async"), async_save=True) as background:
        # the first async save writes the file on this thread (the error comes out of save()); a later one
        # copies a snapshot (small's buffers reused) and fails in the writer's thread (out of wait())
        results["async"] = _outcome(lambda: (background.save(1, model=big), background.wait()))
        background.save(2, model=small)
        background.wait()
        background.save(3, model=small, extra=big.weight)
        results["async_later"] = _outcome(background.wait)
    print(json.dumps(results), flush=True)


def hold(directory: str) -> None:
    ckpt = torchckpt.Checkpointer(directory, keep_last=1)
    model = torch.nn.Linear(4, 4)
    for step in (1, 2, 3):
        ckpt.save(step, model=model)
    print("ready", flush=True)
    sys.stdin.readline()
    ckpt.save(4, model=model)
    print("saved 4", flush=True)


def _die(*a, **k) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(where: str) -> None:
    """Make this process SIGKILL itself at ``where`` in its next save (it patches its own os calls)."""
    import torchckpt.storage.atomic as atomic

    real_replace, real_remove = os.replace, os.remove
    if where in ("before-sidecar", "between-renames"):  # data file under its final name, sidecar not yet renamed
        def replace(src, dst, *a, **k):
            real_replace(src, dst, *a, **k)
            if str(dst).endswith(".pt"):
                _die()

        os.replace = replace  # one os module for every torchckpt module of this process
    elif where == "after-weights":  # weights file renamed; data file and sidecar not yet
        def replace(src, dst, *a, **k):
            real_replace(src, dst, *a, **k)
            if str(dst).endswith(".safetensors"):
                _die()

        os.replace = replace
    elif where == "before-old-sidecar-removed":  # every new file durable under its temp name, nothing renamed
        def remove(path, *a, **k):
            if str(path).endswith(".meta.json"):
                _die()
            real_remove(path, *a, **k)

        os.remove = remove
    elif where == "after-old-sidecar-removed":  # the old sidecar is gone, the new files not yet renamed
        def remove(path, *a, **k):
            real_remove(path, *a, **k)
            if str(path).endswith(".meta.json"):
                _die()

        os.remove = remove
    elif where == "before-dir-fsync":  # every file renamed, the directory not yet fsynced
        atomic.fsync_dir = _die


def kill_at(where: str, directory: str) -> None:
    """Die by SIGKILL at a precise point of the protocol, in the save of step 3."""
    ckpt = torchckpt.Checkpointer(directory, keep_last=1,
                                  weights_format="safetensors" if where == "after-weights" else "pt")
    model = torch.nn.Linear(4, 4)
    ckpt.save(1, model=model)
    ckpt.save(2, model=model)
    if where == "inside-retention":  # step 3 committed; retention removed step 2's sidecar, not its data
        real_remove = os.remove

        def remove(path, *a, **k):
            real_remove(path, *a, **k)
            if path.endswith(".meta.json"):
                _die()

        os.remove = remove  # one os module for every torchckpt module of this process
    else:
        _kill_at(where)
    ckpt.save(3, model=model)
    print("not killed", flush=True)


def overwrite_kill(path: str, where: str) -> None:
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.bias.fill_(1)
    torchckpt.save(path, model=model, step=1)
    with torch.no_grad():
        model.bias.fill_(2)
    _kill_at(where)
    torchckpt.save(path, model=model, step=2)
    print("not killed", flush=True)


def new_kill(path: str, where: str) -> None:
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.bias.fill_(1)
    _kill_at(where)
    torchckpt.save(path, model=model, step=1)
    print("not killed", flush=True)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "diskfull":
        diskfull(args[0], args[1] if len(args) > 1 else None)
    elif mode == "hold":
        hold(args[0])
    elif mode == "kill-at":
        kill_at(args[0], args[1])
    elif mode == "overwrite-kill":
        overwrite_kill(args[0], args[1] if len(args) > 1 else "between-renames")
    elif mode == "new-kill":
        new_kill(args[0], args[1])
