"""Async saves hold the state of the moment ``save()`` was called, bit for bit, with the layout a sync save writes."""

from __future__ import annotations

import math

import torch

import torchckpt
from torchckpt.train.snapshot import cpu_snapshot


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(_bits(a), _bits(b))


def _tensors(obj, where=""):
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{where}[{i}]")


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 32))
    model[2].weight = model[0].weight  # tied: one storage under two names
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    big = torch.randn(16, 8)
    extra = {"big": big, "rows": big[2:10], "cols": big.t(), "half": torch.randn(5).half(),
             "bf16": torch.randn(5).bfloat16(), "int": torch.arange(7), "bool": torch.tensor([True, False]),
             "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4), "odd": torch.tensor([math.nan, -0.0, math.inf]),
             "conj": torch.randn(3, dtype=torch.complex64).conj(), "list": [torch.ones(2), (torch.zeros(3),)]}
    return model, opt, extra


def _train_step(model, opt):
    model.train()
    opt.zero_grad()
    model(torch.randn(8, 32)).pow(2).mean().backward()
    opt.step()


def _mutate_everything(model, opt, extra):
    """What a training loop does right after save() returns: change every tensor in place."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.add_(1) if t.is_floating_point() else t.add_(5)
        for state in opt.state.values():
            for v in state.values():
                v.add_(1)
        for _, t in _tensors(extra):
            if t.numel():
                t.fill_(True) if t.dtype == torch.bool else t.zero_().add_(7)


def test_the_file_holds_the_values_of_the_moment_save_was_called(tmp_path):
    model, opt, extra = _setup()
    expected = {}
    with torchckpt.Checkpointer(tmp_path / "async", keep_last=5, async_save=True) as ckpt:
        for step in (1, 2, 3):
            _train_step(model, opt)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "extra": extra}
            expected[step] = {k: v.resolve_conj().clone() for k, v in _tensors(state)}
            ckpt.save(step, model=model, optimizer=opt, extra=extra)
            _mutate_everything(model, opt, extra)  # before the writer thread has written anything
    ckpt = torchckpt.Checkpointer(tmp_path / "async")
    assert [c.step for c in ckpt.checkpoints()] == [1, 2, 3]
    for step in (1, 2, 3):
        saved = torch.load(ckpt.path_for(step), weights_only=True)
        got = {k: v for k, v in _tensors({"model": saved["model"], "optimizer": saved["optimizer"],
                                           "extra": saved["extra"]})}
        assert got.keys() == expected[step].keys()
        bad = [k for k, v in expected[step].items() if not torch.equal(_bits(v), _bits(got[k]))]
        assert not bad, (step, bad)


def test_async_files_keep_the_storage_layout_of_a_sync_save(tmp_path):
    model, opt, extra = _setup()
    _train_step(model, opt)
    torchckpt.save(tmp_path / "sync.pt", model=model, optimizer=opt, extra=extra, step=1)
    with torchckpt.Checkpointer(tmp_path / "async", async_save=True) as ckpt:
        ckpt.save(1, model=model, optimizer=opt, extra=extra)
        _mutate_everything(model, opt, extra)
    sync = torch.load(tmp_path / "sync.pt", weights_only=True)
    background = torch.load(ckpt.path_for(1), weights_only=True)
    for (where, a), (_, b) in zip(_tensors(sync), _tensors(background), strict=True):
        assert _same_bits(a, b) and a.storage_offset() == b.storage_offset(), where
        assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes(), where  # the whole storage, as torch writes it

    def sharing(obj):  # which tensors share a storage with which
        ptrs = [t.untyped_storage().data_ptr() for _, t in _tensors(obj)]
        return [ptrs.index(p) for p in ptrs]

    assert sharing(background) == sharing(sync)
    assert background["model"]["0.weight"].untyped_storage().data_ptr() \
        == background["model"]["2.weight"].untyped_storage().data_ptr()  # tied weights stay tied
    assert background["extra"]["rows"].untyped_storage().data_ptr() \
        == background["extra"]["big"].untyped_storage().data_ptr()  # a view stays a view


def test_snapshot_buffers_are_reused_and_never_alias_the_source():
    model, opt, extra = _setup()
    buffers: dict = {}
    first = cpu_snapshot({"model": model.state_dict(), "extra": extra}, buffers)
    kept = {k: v for k, v in buffers.items()}
    second = cpu_snapshot({"model": model.state_dict(), "extra": extra}, buffers)
    assert buffers.keys() == kept.keys() and all(buffers[k] is kept[k] for k in kept)  # no new allocation
    for (where, a), (_, b), (_, src) in zip(_tensors(first), _tensors(second),
                                            _tensors({"model": model.state_dict(), "extra": extra}), strict=True):
        assert _same_bits(b, src.detach()), where
        if src.numel():
            assert b.untyped_storage().data_ptr() != src.untyped_storage().data_ptr(), where
