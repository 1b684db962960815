"""torchckpt.transforms in load_into, each checked against its reference implementation (timm's functions,
transformers' mean resizing), on checkpoint files the tests write."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchckpt
from torchckpt import StateDictMismatchError
from torchckpt.transforms import AdaptInputConv, Fuse, InterpolatePosEmbed, MeanResize, Split, Stack, Unstack
from timm_ref import timm_module


class ViTish(nn.Module):
    def __init__(self, grid: int, in_chans: int = 3, prefix: int = 1, classes: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, prefix + grid * grid, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)


def saved(tmp_path, model: nn.Module, name: str = "ckpt.pt") -> str:
    path = str(tmp_path / name)
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("prefix,old,new,dtype", [(1, 14, 24, torch.float32), (0, 7, 5, torch.float32),
                                                  (2, 4, 9, torch.bfloat16)])
def test_interpolate_pos_embed_matches_timm(tmp_path, prefix, old, new, dtype):
    ref = timm_module("layers.pos_embed").resample_abs_pos_embed
    torch.manual_seed(0)
    src = ViTish(old, prefix=prefix).to(dtype)
    dst = ViTish(new, prefix=prefix).to(dtype)
    report = torchckpt.load_into(dst, saved(tmp_path, src), transforms=[InterpolatePosEmbed()])
    expected = ref(src.pos_embed.detach(), [new, new], num_prefix_tokens=prefix)
    assert torch.equal(dst.pos_embed.detach(), expected)
    assert torch.equal(dst.pos_embed.detach()[:, :prefix], src.pos_embed.detach()[:, :prefix])
    [adapted] = report.adapted
    assert (adapted.key, adapted.transform) == ("pos_embed", "interpolate_pos_embed")
    assert f"{old}x{old} -> {new}x{new}" in adapted.detail and "pos_embed" in str(report)
    assert report.ok and report.applied


def test_interpolate_pos_embed_non_square(tmp_path):
    ref = timm_module("layers.pos_embed").resample_abs_pos_embed
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 6 * 4, 8)
    model = nn.Module()
    model.pos_embed = nn.Parameter(torch.zeros(1, 1 + 3 * 5, 8))
    torchckpt.load_into(model, {"pos_embed": pos},
                        transforms={"pos_embed": InterpolatePosEmbed(1, old_size=(6, 4), new_size=(3, 5))})
    assert torch.equal(model.pos_embed.detach(), ref(pos, [3, 5], old_size=[6, 4], num_prefix_tokens=1))


@pytest.mark.parametrize("old,new", [(3, 1), (3, 4), (3, 8), (1, 3), (3, 2)])
def test_adapt_input_conv_matches_timm(tmp_path, old, new):
    ref = timm_module("models._manipulate").adapt_input_conv
    torch.manual_seed(0)
    src, dst = ViTish(4, in_chans=old), ViTish(4, in_chans=new)
    report = torchckpt.load_into(dst, saved(tmp_path, src), transforms="adapt_input_conv")
    expected = ref(new, src.patch_embed.weight.detach().clone(), base_chans=old)
    assert torch.equal(dst.patch_embed.weight.detach(), expected)
    assert [(a.key, a.transform) for a in report.adapted] == [("patch_embed.weight", "adapt_input_conv")]


def test_mean_resize_matches_transformers_mean_resizing(tmp_path):
    """transformers adds new rows from N(mean, 1e-9 * cov); with fewer rows than dims the covariance is not
    positive definite and it takes the mean itself (its deterministic path): equal to ours."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=12, n_positions=8, n_embd=32, n_layer=1, n_head=2)
    small = GPT2LMHeadModel(config)
    path = saved(tmp_path, small)
    reference = GPT2LMHeadModel(config)
    reference.load_state_dict(small.state_dict())
    reference.resize_token_embeddings(20, mean_resizing=True)
    grown = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=32, n_layer=1, n_head=2))
    report = torchckpt.load_into(grown, path, on_mismatch="adapt")
    assert torch.equal(grown.transformer.wte.weight, reference.transformer.wte.weight)
    assert torch.equal(grown.lm_head.weight, reference.lm_head.weight)  # tied to wte on both sides
    assert {a.transform for a in report.adapted} == {"mean_resize"}
    assert "transformer.wte.weight" in {a.key for a in report.adapted}


def test_mean_resize_shrinks_to_leading_rows_and_grows_bias():
    torch.manual_seed(0)
    w, b = torch.randn(10, 4), torch.randn(10)
    small, big = nn.Linear(4, 6), nn.Linear(4, 13)
    torchckpt.load_into(small, {"weight": w, "bias": b}, transforms=[MeanResize()])
    assert torch.equal(small.weight.detach(), w[:6]) and torch.equal(small.bias.detach(), b[:6])
    torchckpt.load_into(big, {"weight": w, "bias": b}, transforms=["mean_resize"])
    assert torch.equal(big.weight.detach()[:10], w) and torch.equal(big.bias.detach()[10:], b.mean().expand(3))
    assert torch.allclose(big.weight.detach()[12], w.mean(0))


def test_adapt_chooses_by_shape_and_name_and_dry_run_names_each(tmp_path):
    torch.manual_seed(0)
    src, dst = ViTish(4, in_chans=3, classes=10), ViTish(6, in_chans=1, classes=12)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    plan = torchckpt.load_into(dst, saved(tmp_path, src), on_mismatch="adapt", dry_run=True)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # a plan only
    got = {a.key: a.transform for a in plan.adapted}
    assert got == {"pos_embed": "interpolate_pos_embed", "patch_embed.weight": "adapt_input_conv",
                   "head.weight": "mean_resize", "head.bias": "mean_resize"}
    text = str(plan)
    for key, name in got.items():
        assert f"adapted: {key} <- {key} by {name}" in text
    assert plan.to_dict()["adapted"][0]["transform"] in got.values()
    report = torchckpt.load_into(dst, saved(tmp_path, src), on_mismatch="adapt")
    assert report.ok and report.applied and len(report.adapted) == 4


def test_adapt_fails_naming_why_none_fits(tmp_path):
    src, dst = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), nn.Sequential(nn.Linear(4, 8), nn.Linear(6, 2))
    with pytest.raises(StateDictMismatchError) as info:
        torchckpt.load_into(dst, saved(tmp_path, src), on_mismatch="adapt")
    text = str(info.value)
    assert "1.weight" in text and "no transform fits" in text and "only the first dimension" in text
    with pytest.raises(StateDictMismatchError, match="adapt_input_conv cannot adapt 1.weight"):
        torchckpt.load_into(dst, saved(tmp_path, src), transforms={"1.weight": "adapt_input_conv"})


def test_mismatch_error_and_dry_run_suggest_the_transform(tmp_path):
    torch.manual_seed(0)
    src, dst = ViTish(4), ViTish(6)
    with pytest.raises(StateDictMismatchError) as info:
        torchckpt.load_into(dst, saved(tmp_path, src))
    assert "fits InterpolatePosEmbed: pass on_mismatch=\"adapt\" or transforms={'pos_embed': " \
           "'interpolate_pos_embed'}" in str(info.value)
    plan = torchckpt.load_into(dst, saved(tmp_path, src), dry_run=True)
    [m] = plan.mismatched
    assert "transforms={'pos_embed': 'interpolate_pos_embed'}" in m.note and m.note in str(plan)
    # the suggestion, applied as written, loads
    assert torchckpt.load_into(dst, saved(tmp_path, src), transforms={'pos_embed': 'interpolate_pos_embed'}).ok


class Split3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        return self.qkv(x)


def test_fuse_and_split_in_rename(tmp_path):
    torch.manual_seed(0)
    split = nn.Sequential(Split3(), nn.Linear(24, 2))
    fused = nn.Sequential(Fused(), nn.Linear(24, 2))
    rules = {(r"^0\.q_proj\.", r"^0\.k_proj\.", r"^0\.v_proj\."): "0.qkv."}
    report = torchckpt.load_into(fused, saved(tmp_path, split), rename=rules)
    assert report.ok
    q, k, v = (getattr(split[0], n) for n in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(fused[0].qkv.weight, torch.cat([q.weight, k.weight, v.weight]))
    x = torch.randn(5, 8)
    assert torch.allclose(fused(x), split(x), atol=1e-6)
    assert {a.key for a in report.adapted} == {"0.qkv.weight", "0.qkv.bias"}
    assert report.adapted[0].checkpoint_keys == ("0.q_proj.weight", "0.k_proj.weight", "0.v_proj.weight")
    back = nn.Sequential(Split3(), nn.Linear(24, 2))
    report = torchckpt.load_into(back, saved(tmp_path, fused, "f.pt"),
                                 rename={r"^0\.qkv\.": ["0.q_proj.", "0.k_proj.", "0.v_proj."]})
    assert report.ok and torch.equal(back[0].v_proj.bias, v.bias)
    assert torch.equal(back(x), split(x))


def test_fuse_split_other_dim_and_errors(tmp_path):
    torch.manual_seed(0)
    a, b = torch.randn(4, 3), torch.randn(4, 5)
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(4, 8))
    report = torchckpt.load_into(model, {"a.w": a, "b.w": b}, transforms=[Fuse([r"^a\.", r"^b\."], "", dim=1)])
    assert report.ok and torch.equal(model.w.detach(), torch.cat([a, b], dim=1))
    two = nn.Module()
    two.x, two.y = nn.Parameter(torch.zeros(4, 4)), nn.Parameter(torch.zeros(4, 4))
    whole = torch.randn(4, 8)
    torchckpt.load_into(two, {"w": whole}, transforms=[Split("^w$", ["x", "y"], dim=1)])
    assert torch.equal(two.y.detach(), whole[:, 4:])
    with pytest.raises(StateDictMismatchError, match="cannot split w of shape \\[4, 8\\] evenly into 3"):
        torchckpt.load_into(two, {"w": whole}, transforms=[Split("^w$", ["x", "y", "z"], dim=1)])


def test_stack_and_unstack_experts(tmp_path):
    torch.manual_seed(0)
    experts = {f"moe.experts.{i}.w1": torch.randn(6, 4) for i in range(3)}
    stacked = nn.Module()
    stacked.moe = nn.Module()
    stacked.moe.w1 = nn.Parameter(torch.zeros(3, 6, 4))
    report = torchckpt.load_into(stacked, experts, transforms=[Stack(r"experts\.(\d+)\.w1", "w1")])
    assert report.ok and torch.equal(stacked.moe.w1.detach(), torch.stack(list(experts.values())))
    per = nn.Module()
    per.moe = nn.Module()
    per.moe.experts = nn.ModuleList([nn.Module() for _ in range(3)])
    for e in per.moe.experts:
        e.w1 = nn.Parameter(torch.zeros(6, 4))
    report = torchckpt.load_into(per, saved(tmp_path, stacked), transforms=[Unstack(r"\.w1$", ".experts.{i}.w1")])
    assert report.ok and torch.equal(per.moe.experts[2].w1.detach(), experts["moe.experts.2.w1"])


def test_names_and_errors_for_bad_specs():
    with pytest.raises(ValueError, match="unknown transform 'bicubic'"):
        torchckpt.load_into(nn.Linear(2, 2), {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)},
                            transforms="bicubic")
    assert torchckpt.transforms.by_name("adapt_input_conv").name == AdaptInputConv.name


@pytest.mark.parametrize("old,new,extra,flat", [(7, 12, 3, True), (12, 7, 0, True), (7, 10, 0, False)])
def test_resize_rel_pos_table_matches_timm(old, new, extra, flat):
    ref = timm_module("layers.pos_embed_rel").resize_rel_pos_bias_table
    torch.manual_seed(0)
    heads = 3
    src_shape = ((2 * old - 1) ** 2 + extra, heads) if flat else (heads, 2 * old - 1, 2 * old - 1)
    dst_shape = ((2 * new - 1) ** 2 + extra, heads) if flat else (heads, 2 * new - 1, 2 * new - 1)
    table = torch.randn(src_shape)
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].relative_position_bias_table = nn.Parameter(torch.zeros(dst_shape))
    report = torchckpt.load_into(model, {"blocks.0.relative_position_bias_table": table}, on_mismatch="adapt")
    expected = ref(table, (new, new), dst_shape)
    got = model.blocks[0].relative_position_bias_table.detach()
    assert torch.equal(got, expected)
    assert [a.transform for a in report.adapted] == ["resize_rel_pos_table"]


def test_fuse_and_split_layouts_are_suggested_with_the_argument(tmp_path):
    torch.manual_seed(0)
    split = nn.Sequential(Split3(), nn.Linear(24, 2))
    fused = nn.Sequential(Fused(), nn.Linear(24, 2))
    plan = torchckpt.load_into(fused, saved(tmp_path, split), dry_run=True)
    rule = "rename={('\\\\.q_proj\\\\.', '\\\\.k_proj\\\\.', '\\\\.v_proj\\\\.'): '.qkv.'}"
    assert f"would fit with fuse: {rule}" in str(plan)
    with pytest.raises(StateDictMismatchError) as info:
        torchckpt.load_into(fused, saved(tmp_path, split))
    assert rule in str(info.value)
    # the suggestion as written loads
    assert torchckpt.load_into(fused, saved(tmp_path, split),
                               rename={('\\.q_proj\\.', '\\.k_proj\\.', '\\.v_proj\\.'): '.qkv.'}).ok
    back = nn.Sequential(Split3(), nn.Linear(24, 2))
    plan = torchckpt.load_into(back, saved(tmp_path, fused, "f.pt"), dry_run=True)
    assert "would fit with split: rename={'\\\\.qkv\\\\.': ['.q_proj.', '.k_proj.', '.v_proj.']}" in str(plan)


def test_check_mapping_reports_max_delta_of_fuse_and_catches_a_wrong_order(tmp_path):
    torch.manual_seed(0)
    path = saved(tmp_path, nn.Sequential(Split3(), nn.Linear(24, 2)))
    probe = torch.randn(4, 8)
    check = torchckpt.check_mapping(nn.Sequential(Split3(), nn.Linear(24, 2)), nn.Sequential(Fused(), nn.Linear(24, 2)),
                                    path, probe, rename={(r"\.q_proj\.", r"\.k_proj\.", r"\.v_proj\."): ".qkv."})
    assert check.max_abs_delta < 1e-5 and check.outputs == 1 and check.report.ok
    assert "max |delta|" in str(check)
    wrong = torchckpt.check_mapping(nn.Sequential(Split3(), nn.Linear(24, 2)), nn.Sequential(Fused(), nn.Linear(24, 2)),
                                    path, probe, rename={(r"\.k_proj\.", r"\.q_proj\.", r"\.v_proj\."): ".qkv."})
    assert wrong.max_abs_delta > 1e-3


def test_sizes_a_file_declares_are_bounded():
    """A hostile file declares a dim 0 of 100000 with no bytes behind it (numel 0): Unstack would make
    100000 keys and a relative-position resize would loop over 50000-point grids; both refuse, naming why."""
    per = nn.Module()
    per.w = nn.Parameter(torch.zeros(4))
    with pytest.raises(StateDictMismatchError, match="would make 100000 tensors"):
        torchckpt.load_into(per, {"moe.w1": torch.empty(100000, 0)}, transforms=[Unstack(r"\.w1$", ".{i}")])
    table = nn.Module()
    table.relative_position_bias_table = nn.Parameter(torch.zeros(2, 13, 13))
    with pytest.raises(StateDictMismatchError, match="empty or implausibly large"):
        torchckpt.load_into(table, {"relative_position_bias_table": torch.empty(2, 100001, 0)}, on_mismatch="adapt")


def test_interpolate_nhwc_pos_embed_matches_timm():
    ref = timm_module("layers.pos_embed").resample_abs_pos_embed_nhwc
    torch.manual_seed(0)
    pos = torch.randn(1, 8, 6, 12)
    model = nn.Module()
    model.pos_embed = nn.Parameter(torch.zeros(1, 14, 10, 12))
    report = torchckpt.load_into(model, {"pos_embed": pos}, on_mismatch="adapt")
    assert torch.equal(model.pos_embed.detach(), ref(pos, [14, 10]))
    assert "8x6 -> 14x10 grid" in report.adapted[0].detail


def test_a_transformers_vit_at_a_new_image_size_and_channels(tmp_path):
    """A real model built locally: transformers' ViT (224-style 4x4 grid, RGB) into the same ViT at a 6x6
    grid with one input channel, in one call; each tensor equals timm's reference."""
    from transformers import ViTConfig, ViTModel

    resample = timm_module("layers.pos_embed").resample_abs_pos_embed
    adapt = timm_module("models._manipulate").adapt_input_conv
    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=8)
    torch.manual_seed(0)
    src = ViTModel(ViTConfig(image_size=32, num_channels=3, **small))
    dst = ViTModel(ViTConfig(image_size=48, num_channels=1, **small))
    plan = torchckpt.load_into(dst, saved(tmp_path, src), on_mismatch="adapt", dry_run=True)
    assert {a.key: a.transform for a in plan.adapted} == {
        "embeddings.position_embeddings": "interpolate_pos_embed",
        "embeddings.patch_embeddings.projection.weight": "adapt_input_conv"}
    report = torchckpt.load_into(dst, saved(tmp_path, src), on_mismatch="adapt")
    assert report.ok
    assert torch.equal(dst.embeddings.position_embeddings,
                       resample(src.embeddings.position_embeddings.detach(), [6, 6], num_prefix_tokens=1))
    assert torch.equal(dst.embeddings.patch_embeddings.projection.weight,
                       adapt(1, src.embeddings.patch_embeddings.projection.weight.detach().clone()))
    dst(torch.randn(1, 1, 48, 48))  # and it runs at the new size
