"""The optimizer follows the weights through load_into's plan (renames, prefixes, fuse/split, new layers):
resume continues bit-for-bit where the mapping is exact, and never gives a state to another shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchckpt
from torchckpt import ResumeError


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randn(16, 24, generator=g)) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data) -> None:
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


class Old(nn.Module):  # the layout the checkpoint was saved from
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(24)

    def forward(self, x):
        return self.norm(torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1))


class Renamed(nn.Module):  # the same network under new names, inside a wrapper, with a new (unused) adapter
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleDict({"query": nn.Linear(8, 8), "key": nn.Linear(8, 8), "value": nn.Linear(8, 8)})
        self.bn = nn.BatchNorm1d(24)
        self.adapter = nn.Linear(24, 24)  # new: in the optimizer, not in the checkpoint

    def forward(self, x):
        b = self.body
        return self.bn(torch.cat([b["query"](x), b["key"](x), b["value"](x)], dim=-1))


RENAME = {r"^q_proj\.": "body.query.", r"^k_proj\.": "body.key.", r"^v_proj\.": "body.value.", r"^norm\.": "bn."}


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
                                      lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)])
def test_resume_through_renames_continues_bit_for_bit(tmp_path, make_opt):
    torch.manual_seed(0)
    data = batches(6)
    old = Old()
    opt = make_opt(old.parameters())
    train(old, opt, data[:3])
    path = str(tmp_path / "ckpt.pt")
    torchckpt.save(path, model=old, optimizer=opt, step=3)
    train(old, opt, data[3:])  # the uninterrupted run

    new = Renamed()
    new_opt = make_opt(new.parameters())
    state = torchckpt.resume(path, model=new, optimizer=new_opt, rename=RENAME, strict=False)
    train(new, new_opt, data[3:])
    for a, b in [(old.q_proj, new.body["query"]), (old.k_proj, new.body["key"]), (old.v_proj, new.body["value"]),
                 (old.norm, new.bn)]:
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert torch.equal(old.norm.running_mean, new.bn.running_mean)
    remap = state.optimizer
    assert set(remap.carried) == {f"body.{n}.{p}" for n in ("query", "key", "value") for p in ("weight", "bias")} \
        | {"bn.weight", "bn.bias"}
    assert set(remap.fresh) == {"adapter.weight", "adapter.bias"}
    assert any("optimizer state carried for 8 parameters" in n for n in state.notes)


def test_resume_fuses_optimizer_state_by_concatenation(tmp_path):
    torch.manual_seed(0)
    old = nn.Sequential(Old())
    opt = torch.optim.Adam(old.parameters(), lr=1e-2)
    train(old, opt, batches(3))
    path = str(tmp_path / "ckpt.pt")
    torchckpt.save(path, model=old, optimizer=opt)

    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.norm = nn.Linear(8, 24), nn.BatchNorm1d(24)

    new = Fused()
    new_opt = torch.optim.Adam(new.parameters(), lr=1e-2)
    state = torchckpt.resume(path, model=nn.DataParallel(new), optimizer=new_opt,
                             rename={(r"^0\.q_proj\.", r"^0\.k_proj\.", r"^0\.v_proj\."): "qkv.", r"^0\.": ""})
    assert state.report.ok
    saved = opt.state
    sources = [old[0].q_proj.weight, old[0].k_proj.weight, old[0].v_proj.weight]
    fused = new_opt.state[new.qkv.weight]
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(fused[name], torch.cat([saved[p][name] for p in sources]))
    assert torch.equal(fused["step"], saved[sources[0]]["step"])
    assert "cat of module.qkv.weight" not in state.optimizer.carried.get("qkv.weight", "")
    assert state.optimizer.carried["module.qkv.weight"].startswith("cat of 0.q_proj.weight")


def test_resume_splits_optimizer_state_and_resized_layers_start_fresh(tmp_path):
    torch.manual_seed(0)
    old = nn.Sequential(nn.Linear(8, 24), nn.Linear(24, 5))
    opt = torch.optim.Adam(old.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        old(torch.randn(4, 8)).sum().backward()
        opt.step()
    path = str(tmp_path / "ckpt.pt")
    torchckpt.save(path, model=old, optimizer=opt)
    new = nn.ModuleDict({"a": nn.Linear(8, 12), "b": nn.Linear(8, 12), "head": nn.Linear(24, 7)})
    new_opt = torch.optim.Adam(new.parameters(), lr=1e-2)
    state = torchckpt.resume(path, model=new, optimizer=new_opt, transforms="mean_resize",
                             rename={r"^0\.": ["a.", "b."], r"^1\.": "head."})
    assert torch.equal(new_opt.state[new["b"].weight]["exp_avg"], opt.state[old[0].weight]["exp_avg"][12:])
    assert set(state.optimizer.fresh) == {"head.weight", "head.bias"}  # mean-resized: another shape
    assert "transform" in state.optimizer.fresh["head.weight"]
    assert new["head"].weight not in new_opt.state


def test_param_names_saved_by_torch_are_used(tmp_path):
    torch.manual_seed(0)
    old = Old()
    opt = torch.optim.Adam(old.named_parameters(), lr=1e-2)
    train(old, opt, batches(2))
    saved = opt.state_dict()
    assert saved["param_groups"][0]["param_names"][0] == "q_proj.weight"
    new = Renamed()
    report = torchckpt.load_into(new, old.state_dict(), rename=RENAME, strict=False)
    new_opt = torch.optim.Adam(new.parameters(), lr=1e-2)
    remap = torchckpt.remap_optimizer_state(saved, optimizer=new_opt, model=new, report=report)
    new_opt.load_state_dict(remap.state_dict)
    assert torch.equal(new_opt.state[new.bn.bias]["exp_avg"], opt.state[old.norm.bias]["exp_avg"])


def test_unnamed_positions_that_do_not_fit_are_refused(tmp_path):
    old = Old()
    opt = torch.optim.Adam([{"params": [old.norm.weight, old.norm.bias]},
                            {"params": [p for n, p in old.named_parameters() if "proj" in n]}], lr=1e-2)
    train(old, opt, batches(1))
    new = Renamed()
    report = torchckpt.load_into(new, old.state_dict(), rename=RENAME, strict=False)
    with pytest.raises(ResumeError, match="cannot tell which parameter"):
        torchckpt.remap_optimizer_state(opt.state_dict(), optimizer=torch.optim.Adam(new.parameters()),
                                        model=new, report=report)
    one = torch.optim.Adam(list(old.parameters())[::-1], lr=1e-2)  # not in the model's order
    train(old, one, batches(1))
    with pytest.raises(ResumeError, match="has exp_avg of shape \\[24\\], but the checkpoint's parameter keys"):
        torchckpt.remap_optimizer_state(one.state_dict(), optimizer=torch.optim.Adam(new.parameters()),
                                        model=new, report=report)


def test_checkpointer_directory_resumes_through_the_mapping(tmp_path):
    torch.manual_seed(0)
    old = Old()
    opt = torch.optim.Adam(old.parameters(), lr=1e-2)
    train(old, opt, batches(2))
    ckpt = torchckpt.Checkpointer(str(tmp_path / "run"))
    ckpt.save(2, model=old, optimizer=opt)
    ckpt.close()
    new = Renamed()
    new_opt = torch.optim.Adam(new.parameters(), lr=1e-2)
    state = torchckpt.resume(str(tmp_path / "run"), model=new, optimizer=new_opt, rename=RENAME, strict=False)
    assert state.step == 2 and len(state.optimizer.carried) == 8
    assert torch.equal(new_opt.state[new.body["value"].weight]["exp_avg_sq"], opt.state[old.v_proj.weight]["exp_avg_sq"])
