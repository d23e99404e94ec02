"""PEFT's LoRA folders: load_adapters reads what PeftModel.save_pretrained wrote for a timm ViT, and
save_adapters(format="peft") writes what PeftModel.from_pretrained loads, with the same outputs
(fp32, eval mode, kernels in the interpreter on machines without CUDA). What a LoraConfig cannot
express is refused with a ValueError naming the PEFT field, and the model is left as it was. The
package itself never imports peft: only these tests do."""

import ast
import copy
import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from fused_adapters.adapters import (
    AdapterConfig,
    LoraConfig,
    active_adapter,
    adapter_configs,
    adapter_state,
    inject,
    load_adapters,
    merge_adapters,
    save_adapters,
    set_adapter,
)
from fused_adapters.adapters.lora import LoraBranch
from helpers import DEVICE, relative_error
from peft_support import import_peft

peft = import_peft()

IMG = 32
ALL = ("qkv", "proj", "fc1", "fc2")
TOLERANCE = 1e-5  # relative, fp32: the same math in another order
# PEFT spellings of the targets that do not match patch_embed.proj (a bare "proj" would).
QKV = ["qkv"]
ALL_REGEX = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
ALL_NAMES = ["qkv", "attn.proj", "mlp.fc1", "fc2"]


def vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=IMG, depth=2).to(DEVICE).eval()


@pytest.fixture(scope="module")
def base():
    """One backbone; every test works on deep copies of it (PEFT's and ours start equal)."""
    return vit()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def forward(model, images):
    with torch.no_grad():
        return model.eval()(images)


def peft_model(base, seed=2, **overrides):
    """get_peft_model on a copy of base, with non-zero lora_B (and a perturbed head copy when
    modules_to_save has it), so the update and the head matter."""
    kwargs = dict(r=4, lora_alpha=6, target_modules=QKV)
    kwargs.update(overrides)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def ours(base, config, name="lora", seed=3):
    """inject on a copy of base, with random lora_A, lora_B and a perturbed head copy."""
    model = inject(copy.deepcopy(base), config, name=name, verbose=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in adapter_state(model, name).items():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def peft_folder(base, tmp_path_factory):
    """A folder PEFT wrote (qkv, rsLoRA, the head), for the refusal tests to edit."""
    folder = tmp_path_factory.mktemp("peft") / "qkv"
    peft_model(base, use_rslora=True, modules_to_save=["head"]).save_pretrained(folder)
    return folder


def edited(source, tmp_path, **fields):
    """A copy of the PEFT folder `source` with adapter_config.json's `fields` set (None writes
    null, as PEFT does for unset fields)."""
    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, adapter_configs(model),
            active_adapter(model), {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model, before):
    state, configs, active, flags = snapshot(model)
    assert configs == before[1] and active == before[2] and flags == before[3]
    assert state.keys() == before[0].keys()
    for key, tensor in state.items():
        assert torch.equal(tensor, before[0][key]), key


# --- PEFT -> ours ---------------------------------------------------------------------------


def crossed(*target_cases):
    """target cases x use_rslora x head. The fast mode runs a covering half (every target case
    with and without each of rsLoRA and the head); -m slow adds the other combinations."""
    params = []
    for index, case in enumerate(target_cases):
        for use_rslora in (False, True):
            for head in (False, True):
                covering = (use_rslora == head) == (index % 2 == 0)
                params.append(pytest.param(*case, use_rslora, head, marks=() if covering else pytest.mark.slow,
                                           id=f"{'+'.join(case[-1])}-{'rslora' if use_rslora else 'lora'}-"
                                              f"{'head' if head else 'nohead'}"))
    return params


@pytest.mark.parametrize("targets, expected, use_rslora, head", crossed((QKV, ("qkv",)), (ALL_REGEX, ALL)))
def test_a_folder_peft_saved_loads_to_the_same_outputs(base, images, tmp_path, targets, expected, use_rslora, head):
    reference = peft_model(base, target_modules=targets, use_rslora=use_rslora,
                           modules_to_save=["head"] if head else None)
    reference.save_pretrained(tmp_path)
    expected_out = forward(reference, images)
    model = load_adapters(copy.deepcopy(base), tmp_path)
    assert adapter_configs(model) == {"default": LoraConfig(rank=4, alpha=6.0, targets=expected, train_head=head,
                                                            use_rslora=use_rslora)}
    assert active_adapter(model) == "default"
    out = forward(model, images)
    assert relative_error(out, expected_out) < TOLERANCE
    assert relative_error(out, forward(base, images)) > 1e-3  # the update (and head) did change the outputs


@pytest.mark.parametrize("targets, exclude, head, expected", [
    (ALL_NAMES, None, True, ALL),
    ("all-linear", None, True, ALL),  # the head is a linear too: modules_to_save takes it out
    ("ALL-LINEAR", None, True, ALL),
    (["qkv", "proj"], ["patch_embed.proj"], False, ("qkv", "proj")),  # "proj" matches patch_embed.proj too
    (["qkv", "fc1"], r"blocks\.\d+\.mlp\..*", False, ("qkv",)),
    (r".*\.(qkv|fc2)", None, False, ("qkv", "fc2")),
])
def test_target_modules_resolve_as_peft_matches_them(base, tmp_path, targets, exclude, head, expected):
    """The modules PEFT adapted get the LoRA branches, with PEFT's weights (outputs: above)."""
    reference = peft_model(base, target_modules=targets, exclude_modules=exclude,
                           modules_to_save=["head"] if head else None)
    reference.save_pretrained(tmp_path)
    model = load_adapters(copy.deepcopy(base), tmp_path)
    assert adapter_configs(model)["default"].targets == expected
    adapted = {name: module for name, module in reference.base_model.model.named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)}
    ours_adapted = {name for name, module in model.named_modules() if isinstance(module, LoraBranch)}
    assert ours_adapted == {f"{name}.lora.default" for name in adapted}
    for name, module in adapted.items():
        branch = model.get_submodule(name).lora["default"]
        assert torch.equal(branch.lora_A.detach().cpu(), module.lora_A["default"].weight.detach().cpu())
        assert torch.equal(branch.lora_B.detach().cpu(), module.lora_B["default"].weight.detach().cpu())


def test_peft_dropout_and_init_carry_over_and_another_adapter_name(base, images, tmp_path):
    """A PEFT adapter that is not "default" is saved in a subfolder named after it; dropout and
    the gaussian init map to the LoraConfig's (eval mode: no dropout)."""
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["fc1"], lora_dropout=0.1, init_lora_weights="gaussian"),
        adapter_name="task")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "task" / "adapter_config.json").is_file()
    model = load_adapters(copy.deepcopy(base), tmp_path / "task", name="task")
    assert adapter_configs(model)["task"] == LoraConfig(rank=2, alpha=3.0, targets=("fc1",), dropout=0.1,
                                                        init="gaussian", train_head=False)
    assert relative_error(forward(model, images), forward(reference, images)) < TOLERANCE


def test_stacks_on_the_model_s_other_adapters(base, images, peft_folder):
    """Loaded into a model that holds a bottleneck and a LoRA adapter (their modules are not
    PEFT's module names: matching ignores them), it becomes one more adapter."""
    model = ours(base, LoraConfig(rank=2, targets=("qkv", "proj")), name="kept")
    inject(model, AdapterConfig(rank=4, drop_path=0.0), name="plain", verbose=False)
    set_adapter(model, "kept")
    kept_before = forward(model, images)
    load_adapters(model, peft_folder)
    assert sorted(adapter_configs(model)) == ["default", "kept", "plain"] and active_adapter(model) == "default"
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), peft_folder)
    assert relative_error(forward(model, images), forward(reference, images)) < TOLERANCE
    set_adapter(model, "kept")
    assert torch.equal(forward(model, images), kept_before)


def test_keys_that_still_hold_the_adapter_name_load(base, images, peft_folder, tmp_path):
    """PEFT strips the adapter name from the keys it saves ("...lora_A.default.weight" ->
    "...lora_A.weight"); a file that kept it (PEFT's loader takes those for the name it loads)
    reads the same."""
    folder = edited(peft_folder, tmp_path)
    state = load_file(folder / "adapter_model.safetensors")
    renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, folder / "adapter_model.safetensors")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), peft_folder)
    model = load_adapters(copy.deepcopy(base), folder)
    assert relative_error(forward(model, images), forward(reference, images)) < TOLERANCE


# --- ours -> PEFT ---------------------------------------------------------------------------


@pytest.mark.parametrize("targets, use_rslora, head", crossed((("qkv",),), (ALL,)))
def test_saved_with_format_peft_peft_loads_to_the_same_outputs(base, images, tmp_path, targets, use_rslora, head):
    model = ours(base, LoraConfig(rank=4, alpha=6.0, targets=targets, use_rslora=use_rslora, train_head=head))
    save_adapters(model, tmp_path, format="peft")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_rslora"] is use_rslora
    assert saved["modules_to_save"] == (["head"] if head else None)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    adapted = sorted(name for name, module in reference.base_model.model.named_modules()
                     if isinstance(module, peft.tuners.lora.LoraLayer))
    assert adapted == sorted(f"blocks.{i}.{path}" for i in range(2) for path, target in (
        ("attn.qkv", "qkv"), ("attn.proj", "proj"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")) if target in targets)
    assert "patch_embed.proj" not in adapted
    expected = forward(model, images)
    assert relative_error(forward(reference, images), expected) < TOLERANCE
    assert relative_error(expected, forward(base, images)) > 1e-3


def test_round_trip_keeps_the_config_and_the_outputs(base, images, tmp_path):
    config = LoraConfig(rank=3, alpha=2.5, targets=("proj", "fc2"), dropout=0.05, init="gaussian", train_head=True,
                        use_rslora=True)
    model = ours(base, config, name="cars")
    save_adapters(model, tmp_path, name="cars", format="peft")
    fresh = load_adapters(copy.deepcopy(base), tmp_path, name="cars")
    assert adapter_configs(fresh) == {"cars": config}
    expected = forward(model, images)
    assert relative_error(forward(fresh, images), expected) < TOLERANCE
    load_adapters(fresh, tmp_path, name="cars")  # into the adapter it has: the same config, the weights again
    assert relative_error(forward(fresh, images), expected) < TOLERANCE


def test_a_merged_adapter_saves_its_unmerged_delta(base, images, tmp_path):
    model = ours(base, LoraConfig(rank=4, targets=("qkv", "fc1")), name="m")
    unmerged = forward(model, images)
    branch = model.blocks[0].attn.qkv.lora["m"]
    merge_adapters(model)
    save_adapters(model, tmp_path, format="peft")
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(state["base_model.model.blocks.0.attn.qkv.lora_B.weight"], branch.lora_B.detach().cpu())
    assert torch.equal(state["base_model.model.blocks.0.attn.qkv.lora_A.weight"], branch.lora_A.detach().cpu())
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # on the original weights
    assert relative_error(forward(reference, images), unmerged) < TOLERANCE


def test_save_refuses_other_kinds_and_formats(base, tmp_path):
    model = inject(copy.deepcopy(base), AdapterConfig(rank=4), name="bottle", verbose=False)
    with pytest.raises(ValueError, match=r"'bottle'.*AdapterConfig.*only LoRA"):
        save_adapters(model, tmp_path / "a", format="peft")
    with pytest.raises(ValueError, match=r"format must be one of \('fused-adapters', 'peft'\), got 'PEFT'"):
        save_adapters(model, tmp_path / "b", format="PEFT")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    save_adapters(model, tmp_path / "c", format="fused-adapters")  # the default, spelled out
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["kind"] == "adapter"


# --- refusals -------------------------------------------------------------------------------

REFUSED = [
    # (fields written into PEFT's adapter_config.json, what the message says)
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"use_dora": True}, "use_dora"),
    ({"rank_pattern": {"blocks.0.attn.qkv": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"blocks.0.attn.qkv": 16}}, "alpha_pattern"),
    ({"bias": "all"}, "bias = 'all'"),
    ({"bias": "lora_only"}, "bias = 'lora_only'"),
    ({"lora_bias": True}, "lora_bias"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"layers_pattern": "blocks"}, "layers_pattern"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights = 'pissa'"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights = 'pissa_niter_4'"),
    ({"init_lora_weights": "olora"}, "init_lora_weights = 'olora'"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, "init_lora_weights = 'loftq'"),
    ({"init_lora_weights": "eva"}, "init_lora_weights = 'eva'"),
    ({"trainable_token_indices": [0, 1]}, "trainable_token_indices"),
    ({"use_qalora": True}, "use_qalora"),
    ({"target_parameters": ["blocks.0.attn.qkv.weight"]}, "target_parameters"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config"),
    ({"alora_invocation_tokens": [3, 4]}, "alora_invocation_tokens"),
    ({"velora_config": {"num_groups": 4}}, "velora_config"),
    ({"monteclora_config": {"num_samples": 2}}, "monteclora_config"),
    ({"use_bdlora": {"nblocks": 2}}, "use_bdlora"),
    ({"arrow_config": {"top_k": 2}}, "arrow_config"),
    ({"kasa_config": {"beta": 1.0}}, "kasa_config"),
    ({"a_future_option": "on"}, "a_future_option"),
    ({"target_modules": ["proj"]}, r"target_modules \['proj'\].*patch_embed\.proj \(Conv2d\)"),
    ({"target_modules": "all-linear", "modules_to_save": None}, r"target_modules 'all-linear'.*head \(Linear\)"),
    ({"target_modules": ["norm1"]}, r"target_modules \['norm1'\].*norm1 \(LayerNorm\)"),
    ({"target_modules": ["blocks.0.attn.qkv"]}, r"target_modules.*in some blocks but not \['blocks\.1\.attn\.qkv'\]"),
    ({"target_modules": r"blocks\.1\.mlp\.fc.*"}, r"target_modules.*mlp\.fc1 in some blocks"),
    ({"target_modules": ["nothing_here"]}, r"target_modules \['nothing_here'\] matches none"),
    ({"target_modules": None}, "target_modules is null"),
    ({"target_modules": "blocks.("}, "target_modules 'blocks.\\(' is not a valid regex"),
    ({"modules_to_save": ["head", "norm"]}, r"modules_to_save entry 'norm' matches \['norm'\]"),
    ({"modules_to_save": ["blocks.0.norm1"]}, r"modules_to_save entry 'blocks.0.norm1'"),
    ({"r": 0}, "field r must be an int"),
    ({"r": 300}, "field r must be an int from 1 to 256"),
    ({"lora_alpha": 0}, "field lora_alpha must be a positive"),
    ({"lora_dropout": 1.5}, r"field lora_dropout must be a number in \[0, 1\)"),
    ({"use_rslora": "yes"}, "field use_rslora must be true or false"),
]


@pytest.mark.parametrize("fields, message", REFUSED, ids=[next(iter(fields)) + f"-{i}" for i, (fields, _) in
                                                           enumerate(REFUSED)])
def test_what_a_lora_config_cannot_express_is_refused_and_changes_nothing(base, peft_folder, tmp_path, fields,
                                                                          message):
    folder = edited(peft_folder, tmp_path, **fields)
    model = ours(base, LoraConfig(rank=2, targets=("fc1",)), name="kept")  # a model with an adapter already
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as error:
        load_adapters(model, folder)
    assert str(folder / "adapter_config.json") in str(error.value)
    assert_unchanged(model, before)
    plain = copy.deepcopy(base)  # and a model without any
    plain_before = snapshot(plain)
    with pytest.raises(ValueError, match=message):
        load_adapters(plain, folder)
    assert_unchanged(plain, plain_before)


def test_unset_and_informational_fields_are_accepted(base, peft_folder, tmp_path):
    """Fields at PEFT's unset value, the init sub-configs (read only by the refused inits), and
    those that say nothing about the math load as before."""
    folder = edited(peft_folder, tmp_path, a_future_option=None, eva_config={"rho": 2.0},
                    task_type="FEATURE_EXTRACTION", layers_to_transform=[], target_parameters=[],
                    init_lora_weights=False, exclude_modules=["patch_embed.proj"], ensure_weight_tying=True)
    model = load_adapters(copy.deepcopy(base), folder)
    assert adapter_configs(model)["default"] == LoraConfig(rank=4, alpha=6.0, targets=("qkv",), use_rslora=True)


def test_exclude_modules_applies_in_the_matching(base, peft_folder, tmp_path):
    """PEFT's "proj" matches patch_embed.proj too; excluding it leaves attn.proj in every block."""
    folder = edited(peft_folder, tmp_path, target_modules=["qkv", "proj"], exclude_modules=r"patch_embed\..*")
    state = load_file(folder / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(7)
    for i in range(2):
        state[f"base_model.model.blocks.{i}.attn.proj.lora_A.weight"] = torch.randn(4, 64, generator=generator)
        state[f"base_model.model.blocks.{i}.attn.proj.lora_B.weight"] = torch.randn(64, 4, generator=generator)
    save_file(state, folder / "adapter_model.safetensors")
    model = load_adapters(copy.deepcopy(base), folder)
    assert adapter_configs(model)["default"].targets == ("qkv", "proj")
    assert torch.equal(model.blocks[1].attn.proj.lora["default"].lora_B.detach().cpu(),
                       state["base_model.model.blocks.1.attn.proj.lora_B.weight"])


@pytest.mark.parametrize("change, message", [
    ("missing", r"missing tensors \['base_model\.model\.blocks\.1\.attn\.qkv\.lora_B\.weight'\]"),
    ("unexpected", r"unexpected tensors \['base_model\.model\.blocks\.0\.attn\.proj\.lora_A\.weight'\]"),
    ("shape", r"base_model\.model\.blocks\.0\.attn\.qkv\.lora_A\.weight has shape \(4, 32\), the model expects "
              r"\(4, 64\)"),
    ("head", r"missing tensors \['base_model\.model\.head\.bias'"),
    ("names", r"several adapters \['a', 'b'\]"),
], ids=["missing", "unexpected", "shape", "head", "names"])
def test_tensors_that_do_not_fit_are_refused_naming_the_file_and_key(base, peft_folder, tmp_path, change, message):
    folder = edited(peft_folder, tmp_path)
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    if change == "missing":
        del state["base_model.model.blocks.1.attn.qkv.lora_B.weight"]
    elif change == "unexpected":
        state["base_model.model.blocks.0.attn.proj.lora_A.weight"] = torch.zeros(4, 64)
    elif change == "shape":
        state["base_model.model.blocks.0.attn.qkv.lora_A.weight"] = torch.zeros(4, 32)
    elif change == "head":
        del state["base_model.model.head.bias"]
    else:
        for i, name in enumerate("ab"):
            key = f"base_model.model.blocks.{i}.attn.qkv.lora_A.weight"
            state[key.replace(".lora_A.", f".lora_A.{name}.")] = state.pop(key)
    save_file(state, weights)
    model = ours(base, LoraConfig(rank=2, targets=("fc1",)), name="kept")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as error:
        load_adapters(model, folder)
    assert str(weights) in str(error.value)
    assert_unchanged(model, before)


def test_the_adapters_code_imports_neither_peft_nor_transformers():
    root = pathlib.Path(__file__).resolve().parent.parent / "adapters"
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] if node.level == 0 else []
            else:
                continue
            assert not any(m.split(".")[0] in ("peft", "transformers") for m in modules), (path.name, modules)


@pytest.mark.slow  # a fresh interpreter: torch, timm and the kernels imported again
def test_the_package_does_not_import_peft(tmp_path):
    """Save and load in PEFT's format in a fresh interpreter: neither peft nor transformers gets
    imported (the adapters' code reads and writes the files with json and safetensors)."""
    code = f"""
import sys
import timm
from fused_adapters.adapters import LoraConfig, inject, load_adapters, save_adapters
def vit():
    return timm.create_model("test_vit", pretrained=False, num_classes=5, img_size={IMG}, depth=1)
save_adapters(inject(vit(), LoraConfig(rank=2), verbose=False), {str(tmp_path)!r}, format="peft")
load_adapters(vit(), {str(tmp_path)!r})
print(sorted(m for m in ("peft", "transformers") if m in sys.modules))
"""
    root = pathlib.Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
