"""Kernel variants: listing, choosing, what each one changes in the launch plan, and that every
variant gives the float64 reference's answer (forward and every gradient)."""

import pytest
import torch

from fused_adapters.kernels import autotune, bottleneck_adapter, list_variants, tuned_variants, use_variant
from fused_adapters.kernels.bottleneck import configs as bottleneck_configs
from fused_adapters.kernels.bottleneck import plan as bottleneck_plan
from fused_adapters.kernels.launch import launch_plan
from helpers import DEVICE, make_case, poisoned_outputs, relative_error
from test_bottleneck_numerics import check_against_reference

OP = "bottleneck_adapter"
NAMES = list(list_variants(OP))


def test_listing():
    assert NAMES[0] == "default"
    assert set(NAMES) == {"default", "rows16", "rows32", "rows64", "store_act"}
    assert all(isinstance(text, str) and text for text in list_variants(OP).values())
    assert list_variants()[OP] == list_variants(OP)


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="op must be one of .*bottleneck_adapter.*'nope'"):
        list_variants("nope")
    with pytest.raises(ValueError, match=r"variant of bottleneck_adapter must be one of .*rows16.*autotune.*'rows8'"):
        with use_variant(OP, "rows8"):
            pass


def test_blocks_nest_and_restore():
    from fused_adapters.kernels.variants import current_variant

    assert current_variant(OP) == "default"
    with use_variant(OP, "rows16"):
        with use_variant(OP, "store_act"):
            assert current_variant(OP) == "store_act"
        assert current_variant(OP) == "rows16"
    assert current_variant(OP) == "default"
    with pytest.raises(RuntimeError):
        with use_variant(OP, "rows32"):
            raise RuntimeError("inside")
    assert current_variant(OP) == "default"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_variant_matches_float64(name, dtype, monkeypatch):
    # Odd M, D and r; 100 rows give row tiles of 16, 32 and 64 partly masked.
    case = make_case((100, 45), rank=5, dtype=dtype)
    with poisoned_outputs(monkeypatch), use_variant(OP, name):
        check_against_reference(case, dtype)


@pytest.mark.parametrize("name", NAMES)
def test_every_variant_under_fp16_autocast(name, monkeypatch):
    case = make_case((70, 33), rank=3, dtype=torch.float32)
    with poisoned_outputs(monkeypatch), use_variant(OP, name), torch.autocast(DEVICE, dtype=torch.float16):
        out = case.call(bottleneck_adapter)
        grads = torch.autograd.grad(out, [case.x, case.w_down, case.w_up], torch.ones_like(out))
    expected = case.float64()
    ref = expected.call(bottleneck_adapter)
    ref_grads = torch.autograd.grad(ref, [expected.x, expected.w_down, expected.w_up], torch.ones_like(ref))
    assert out.dtype == torch.float32  # fp32 residual promotes y
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert relative_error(got, want) < 5e-3, name


def _plans(name, rows, rank, dtype=torch.float16):
    """The forward launch and the two backward launches the variant gives on a 132-SM GPU."""
    dim = 768
    x = torch.empty(rows, dim, dtype=dtype)
    w_down, w_up = torch.empty(rank, dim, dtype=dtype), torch.empty(dim, rank, dtype=dtype)
    hidden = torch.empty(rows, rank, dtype=dtype)
    variant = next(v for v in bottleneck_configs.VARIANTS if v.name == name)
    with launch_plan(132):
        forward = bottleneck_plan.forward(x, w_down, None, w_up, None, None, 1.0, None, True, None, "gelu", dtype, dtype,
                                          True, variant).launches["forward"]
        backward = bottleneck_plan.backward(x, x, hidden, w_down, w_up, None, None, 1.0, None, "gelu", dtype, True, True,
                                            dtype, variant).launches
    return forward, backward["backward_hidden"], backward["backward_weights"]


def test_what_each_variant_changes():
    rows = 6304  # ViT-B/16 batch 32: the default plan halves the rows to fill 132 SMs twice
    default = _plans("default", rows, 8)
    assert [launch.config.block_rows for launch in default[:2]] == [16, 16]
    assert default[1].constexprs["STORE_ACT"] is False and default[2].constexprs["RECOMPUTE_ACT"] is True
    for name, block_rows in [("rows16", 16), ("rows32", 32), ("rows64", 64)]:
        forward, hidden_launch, weights_launch = _plans(name, rows, 8)
        assert forward.config.block_rows == hidden_launch.config.block_rows == block_rows
        assert forward.grid == (-(-rows // block_rows),)
        assert weights_launch.config == default[2].config  # the weights kernel has no row variants
    store = _plans("store_act", rows, 8)
    assert store[1].constexprs["STORE_ACT"] is True and store[2].constexprs["RECOMPUTE_ACT"] is False
    assert [launch.config for launch in store] == [launch.config for launch in default]
    # Where the configuration's own rows are fewer (fp32, rank 128: 16), rows64 keeps them.
    assert _plans("rows64", rows, 100, torch.float32)[0].config.block_rows == 16
    # Above rank 32 the backward stores act anyway: store_act is the default plan there.
    assert _plans("store_act", rows, 64)[1].constexprs == _plans("default", rows, 64)[1].constexprs


def test_variant_in_force_when_the_backward_runs(monkeypatch):
    # The backward takes the variant in force when it runs, not the forward's.
    seen = []
    original = bottleneck_plan.backward

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(result.launches["backward_hidden"].constexprs["STORE_ACT"])
        return result

    monkeypatch.setattr(bottleneck_plan, "backward", spy)
    case = make_case((40, 24), rank=4)
    with use_variant(OP, "store_act"):
        out = case.call(bottleneck_adapter)
        out.sum().backward(retain_graph=True)
    out.sum().backward()
    assert seen == [True, False]


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA autotune times the variants (test_autotune_on_cuda)")
def test_autotune_without_cuda_runs_the_default(monkeypatch):
    case = make_case((40, 24), rank=4)
    before = tuned_variants()
    with poisoned_outputs(monkeypatch), autotune():
        check_against_reference(case, torch.float32)
    assert tuned_variants() == before  # nothing to time in the interpreter


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="autotune times variants with CUDA events")
def test_autotune_on_cuda(monkeypatch):
    case = make_case((1000, 768), rank=8, dtype=torch.float16)
    with poisoned_outputs(monkeypatch), autotune():
        check_against_reference(case, torch.float16)
        check_against_reference(case, torch.float16)  # the second call reuses the choice
    chosen = [(key, name) for key, name in tuned_variants().items() if key[0] == OP]
    assert {key[1] for key, _ in chosen} == {"forward", "backward"}
    assert all(name in NAMES for _, name in chosen)
