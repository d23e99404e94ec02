"""adapters/: one record per model of what is injected, active and merged, and the kinds' one
interface. Every refusal leaves the record, the tensors and the requires_grad flags as they were;
random sequences of the public calls leave a model that agrees with one built fresh to the same
state; the failures found against the hand-synced flags each have a test here. Small timm ViTs,
kernels in the interpreter on machines without CUDA."""

import copy
import dataclasses
import json
import random
import zlib

import pytest
import timm
import torch
from torch import nn

from fused_adapters.adapters import (
    AdapterConfig,
    LoraConfig,
    LosaConfig,
    SparseAdapter,
    active_adapter,
    adapter_configs,
    adapter_state,
    delete_adapter,
    disable_adapters,
    inject,
    load_adapters,
    merge_adapters,
    merged_adapter,
    model_aux_loss,
    save_adapters,
    set_adapter,
    task_routing,
    unmerge_adapters,
)
from helpers import DEVICE, relative_error

IMG = 32

# The kinds a model holds at once in these tests: names -> configs (no DropPath: outputs are
# deterministic in training too).
CONFIGS = {
    "plain": AdapterConfig(drop_path=0.0),
    "other": AdapterConfig(drop_path=0.0, scaling="layer"),
    "moa": AdapterConfig(drop_path=0.0, experts=4, top_k=2, aux_loss_weight=0.1),
    "lora": LoraConfig(rank=4, targets=("qkv", "proj")),
    "side": LosaConfig(channel_rank=4, token_rank=2, drop_path=0.0),
}


def vit(seed=0, num_classes=5):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=num_classes, img_size=IMG).to(DEVICE)


def images(batch=2, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def fill(model, name, origin):
    """Give adapter `name` (its head copy too) weights drawn from `origin` alone, so two models
    that hold the adapter of one origin hold the same weights whatever they did before."""
    with torch.no_grad():
        for key, tensor in adapter_state(model, name).items():
            generator = torch.Generator().manual_seed(zlib.crc32(f"{origin}/{key}".encode()))
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)


def add(model, name, config=None, origin=None):
    inject(model, config if config is not None else CONFIGS[name], name=name, verbose=False)
    fill(model, name, origin or name)
    return model


def all_kinds():
    model = vit()
    for name in CONFIGS:
        add(model, name)
    return model.eval()


def snapshot(model):
    """(record, tensors, flags, classes): what a refusal must leave as it was."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    classes = {name: type(module) for name, module in model.named_modules()}
    return (adapter_configs(model), active_adapter(model), merged_adapter(model)), tensors, flags, classes


def assert_unchanged(model, before):
    record, tensors, flags, classes = snapshot(model)
    assert record == before[0]
    assert tensors.keys() == before[1].keys()
    changed = [k for k, v in tensors.items() if not torch.equal(v, before[1][k])]
    assert not changed, changed[:5]
    assert flags == before[2]
    assert classes == before[3]


# The failures of the hand-synced flags, one test each ----------------------------------------


def test_aux_loss_is_the_last_forwards_and_only_what_ran():
    model = all_kinds()
    add(model, "moa2", CONFIGS["moa"])
    set_adapter(model, "moa")
    model.train()
    first = model(images()).sum() + model_aux_loss(model)
    assert model_aux_loss(model).item() > 0
    first.backward()
    set_adapter(model, "plain")
    assert model_aux_loss(model).item() == 0.0  # the mixture did not run since
    (model(images()).sum() + model_aux_loss(model)).backward()  # no second backward through the old graph
    set_adapter(model, "moa")
    model(images())
    with disable_adapters(model):
        assert model_aux_loss(model).item() == 0.0
        model(images())
        assert model_aux_loss(model).item() == 0.0
    # Two mixtures injected, one runs: only its losses (one per block) count.
    set_adapter(model, "moa2")
    model(images())
    one = model_aux_loss(model)
    set_adapter(model, "moa")
    model(images())
    assert len(model._fused_record.aux) == len(model.blocks)  # one loss per block: moa2's are gone
    assert not torch.equal(model_aux_loss(model), one)
    model.eval()
    model(images())  # eval: no loss recorded, the training forward's is gone too
    assert model_aux_loss(model).item() == 0.0
    copy.deepcopy(model.train())  # no graph in the copy (deepcopy refuses non-leaf tensors)


@pytest.mark.parametrize("direction", ["into_merged", "merged_into_unmerged"])
def test_refused_load_state_dict_loads_nothing(direction):
    model = all_kinds()
    set_adapter(model, "lora")
    if direction == "into_merged":
        state = copy.deepcopy(model.state_dict())
        merge_adapters(model)
    else:
        merge_adapters(model)
        state = copy.deepcopy(model.state_dict())
        unmerge_adapters(model)
    with torch.no_grad():
        for tensor in state.values():  # every tensor differs from the model's
            if tensor.is_floating_point():
                tensor.add_(1.0)
    before = snapshot(model)
    with pytest.raises(ValueError, match="merged"):
        model.load_state_dict(state)
    assert_unchanged(model, before)
    # Loaded through a wrapper (as a DistributedDataParallel or compiled model is), the same.
    wrapper = nn.ModuleDict({"module": model})
    if direction == "merged_into_unmerged":
        merge_adapters(model)
        wrapped_state = copy.deepcopy(wrapper.state_dict())
        unmerge_adapters(model)
    else:
        unmerge_adapters(model)
        wrapped_state = copy.deepcopy(wrapper.state_dict())
        merge_adapters(model)
    for key in ("module.cls_token", "module.blocks.0.norm1.weight"):
        wrapped_state[key] = wrapped_state[key] + 1.0
    before = snapshot(model)
    with pytest.raises(ValueError, match="merged"):
        wrapper.load_state_dict(wrapped_state)
    assert_unchanged(model, before)


@pytest.mark.parametrize("unfrozen", ["fresh", "hand_unfrozen_block"])
def test_failed_load_adapters_keeps_the_flags(tmp_path, unfrozen):
    source = add(vit(), "lora")
    save_adapters(source, tmp_path / "lora")
    meta = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    meta["config"]["rank"] = 5  # the tensors hold rank 4
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(meta))
    model = vit()
    if unfrozen == "hand_unfrozen_block":
        add(model, "plain")
        model.blocks[2].requires_grad_(True)
    before = snapshot(model)
    trainable = sum(flag for flag in before[2].values())
    assert trainable > 0
    with pytest.raises(ValueError, match="lora_A has shape"):
        load_adapters(model, tmp_path / "lora")
    assert_unchanged(model, before)


@pytest.mark.parametrize("context", ["disable_adapters", "task_routing"])
def test_calls_that_change_the_adapters_raise_inside_a_context(context):
    model = all_kinds()
    set_adapter(model, "plain")
    x = images()
    with torch.no_grad():
        want = model(x)
    enter = disable_adapters(model) if context == "disable_adapters" else task_routing(model, ["plain", "other"])
    with enter:
        inside = snapshot(model)
        calls = [lambda: set_adapter(model, "other"), lambda: delete_adapter(model, "other"),
                 lambda: merge_adapters(model, "lora"), lambda: inject(model, CONFIGS["plain"], name="new"),
                 lambda: add(model, "new", CONFIGS["lora"])]
        for call in calls:
            with pytest.raises(RuntimeError, match=f"inside `with {context}"):
                call()
            assert_unchanged(model, inside)
    assert active_adapter(model) == "plain"
    with torch.no_grad():
        assert torch.equal(model(x), want)  # it computes what active_adapter says


def test_sample_routing_on_an_empty_batch():
    for routing in ("sample", "token"):
        adapter = SparseAdapter(24, 4, 4, 2, routing=routing).to(DEVICE).eval()
        x = torch.randn(0, 7, 24, device=DEVICE)
        assert adapter(x, residual=x).shape == (0, 7, 24)


def test_task_routing_takes_a_tensor_of_indices():
    model = all_kinds()
    x = images()
    with torch.no_grad():
        names = sorted(adapter_configs(model))  # ["lora", "moa", "other", "plain", "side"]
        with task_routing(model, ["plain", "other"]):
            by_name = model(x)
        with task_routing(model, torch.tensor([names.index("plain"), names.index("other")])):
            by_index = model(x)
    assert torch.equal(by_name, by_index)
    for bad, message in ((torch.tensor([7, 0]), r"indices \[7\] are outside"), (torch.tensor([0.5]), "integer"),
                         (torch.tensor([[3]]), "1-D"), ([3, 2], "pass indices as a 1-D integer tensor")):
        before = snapshot(model)
        with pytest.raises(ValueError, match=message):
            with task_routing(model, bad):
                pass
        assert_unchanged(model, before)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "JSON object with format_version"),
    ('{"format_version": 2, "name": "a"', "not valid JSON"),
    ("drop", "no 'model' entry"),
    ("config", "no 'config' entry"),
    ("name", "no 'name' entry"),
    ("model_not_dict", "'model' must be a JSON object"),
    ("config_list", "'config' must be a JSON object"),
    ("unknown_field", "config is not a valid AdapterConfig: unknown AdapterConfig fields"),
    ("rank_string", "AdapterConfig.rank must be an int"),
    ("depth_string", "model.depth must be a JSON integer"),
])
def test_a_malformed_config_file_is_a_value_error_naming_it(tmp_path, text, message):
    model = add(vit(), "plain")
    folder = save_adapters(model, tmp_path / "out")
    path = folder / "adapter_config.json"
    meta = json.loads(path.read_text())
    edits = {"drop": lambda m: m.pop("model"), "config": lambda m: m.pop("config"), "name": lambda m: m.pop("name"),
             "model_not_dict": lambda m: m.update(model=[1]), "config_list": lambda m: m.update(config=[1]),
             "rank_string": lambda m: m["config"].update(rank="8"),
             "unknown_field": lambda m: m["config"].update(size=3),
             "depth_string": lambda m: m["model"].update(depth="12")}
    if text in edits:
        edits[text](meta)
        path.write_text(json.dumps(meta))
    else:
        path.write_text(text)
    fresh = vit()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=message) as error:
        load_adapters(fresh, folder)
    assert str(path) in str(error.value)
    assert_unchanged(fresh, before)


# Every refusal leaves the model as it was ------------------------------------------------------


def _edit_config(folder, **fields):
    path = folder / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta["config"].update(fields)
    path.write_text(json.dumps(meta))


REFUSALS = {
    # inject
    "inject_bad_config": (TypeError, "config must be an AdapterConfig", lambda m, t: inject(m, {"rank": 8})),
    "inject_bad_name": (ValueError, "identifier-like", lambda m, t: inject(m, AdapterConfig(), name="a b")),
    "inject_moduledict_name": (ValueError, "attribute of torch.nn.ModuleDict",
                               lambda m, t: inject(m, AdapterConfig(), name="keys")),
    "inject_taken_name": (ValueError, "already has adapters named 'plain'", lambda m, t: inject(m, AdapterConfig(),
                                                                                              name="plain")),
    "inject_lora_not_linear": (TypeError, r"blocks\[3\].mlp.fc2 is torch.nn.modules.container.Sequential",
                               lambda m, t: inject(m, LoraConfig(targets=("fc2",)), name="new"),
                               lambda m: setattr(m.blocks[3].mlp, "fc2", nn.Sequential(m.blocks[3].mlp.fc2))),
    "inject_losa_blocks": (ValueError, "distinct blocks", lambda m, t: inject(m, LosaConfig(blocks=(9,)), name="new")),
    "inject_not_a_vit": (TypeError, "timm Vision Transformer", lambda m, t: inject(nn.Linear(2, 2), AdapterConfig())),
    # set, delete, merge
    "set_unknown": (ValueError, "no adapters named 'nope'", lambda m, t: set_adapter(m, "nope")),
    "delete_unknown": (ValueError, "no adapters named 'nope' to delete", lambda m, t: delete_adapter(m, "nope")),
    "merge_unknown": (ValueError, "no adapters named 'nope'", lambda m, t: merge_adapters(m, "nope")),
    "merge_bottleneck": (ValueError, "cannot merge adapter 'plain'", lambda m, t: merge_adapters(m, "plain")),
    "merge_mixture": (ValueError, "cannot merge adapter 'moa'", lambda m, t: merge_adapters(m, "moa")),
    "merge_losa": (ValueError, "cannot merge adapter 'side': it is a LoSA", lambda m, t: merge_adapters(m, "side")),
    "merge_none_active": (ValueError, "needs an active LoRA adapter", lambda m, t: merge_adapters(m),
                          lambda m: delete_adapter(m, "lora")),
    # load_adapters
    "load_missing_folder": (FileNotFoundError, "not found", lambda m, t: load_adapters(m, t / "nothing")),
    "load_taken_name_other_config": (ValueError, "were built from", lambda m, t: load_adapters(
        m, save_adapters(add(vit(), "plain", CONFIGS["other"]), t / "o"), name="plain")),
    "load_rank_edited": (ValueError, "has shape", lambda m, t: load_adapters(
        m, (save_adapters(add(vit(), "x", CONFIGS["plain"]), t / "x"), _edit_config(t / "x", rank=3))[0])),
    "load_other_head": (ValueError, "the saved head has shapes", lambda m, t: load_adapters(
        m, save_adapters(add(vit(num_classes=3), "x", CONFIGS["plain"]), t / "x"))),
    "load_lora_edited_targets": (ValueError, "which its config's targets", lambda m, t: load_adapters(
        m, (save_adapters(add(vit(), "x", CONFIGS["lora"]), t / "x"), _edit_config(t / "x", targets=["fc1"]))[0])),
    "load_unknown_kind": (ValueError, "kind 'prompt'", lambda m, t: load_adapters(
        m, (save_adapters(add(vit(), "x", CONFIGS["plain"]), t / "x"), _edit_meta(t / "x", kind="prompt"))[0])),
    # task_routing
    "routing_lora": (ValueError, "'lora' is a LoRA adapter", lambda m, t: task_routing(m, ["plain", "lora"]).__enter__()),
    "routing_mixture": (ValueError, "mixture of experts", lambda m, t: task_routing(m, ["moa"]).__enter__()),
    "routing_unknown": (ValueError, "no adapters named", lambda m, t: task_routing(m, ["zz"]).__enter__()),
}


def _edit_meta(folder, **fields):
    path = folder / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta.update(fields)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "lora_merged"])
@pytest.mark.parametrize("refusal", sorted(REFUSALS))
@pytest.mark.slow  # fast mode: the seven reproduced refusals above
def test_every_refusal_leaves_record_tensors_and_flags(tmp_path, refusal, merged):
    exception, message, call, *prepare = REFUSALS[refusal]
    model = all_kinds()
    set_adapter(model, "lora")
    if merged:
        merge_adapters(model)
    for setup in prepare:
        setup(model)
    x = images()
    with torch.no_grad():
        want = model(x)
    before = snapshot(model)
    with pytest.raises(exception, match=message):
        call(model, tmp_path)
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), want)


# Random sequences of the public calls against a model built fresh to the same state -----------


@dataclasses.dataclass
class Spec:
    """What the calls so far should have made: name -> (config, origin of its weights), in
    injection order; the active and the merged name."""

    adapters: dict = dataclasses.field(default_factory=dict)
    active: object = None
    merged: object = None


def build(spec: Spec):
    """A fresh model in spec's state, made by the plainest calls: inject each adapter in order,
    give it its origin's weights, set the active one, merge."""
    model = vit()
    for name, (config, origin) in spec.adapters.items():
        add(model, name, config, origin)
    if spec.adapters and spec.active is None:  # none active: what deleting the active adapter leaves
        inject(model, AdapterConfig(), name="zz_gone", verbose=False)
        delete_adapter(model, "zz_gone")
    elif spec.active is not None:
        set_adapter(model, spec.active)
    if spec.merged is not None:
        merge_adapters(model)
    return model.eval()


def check(model, spec: Spec, x):
    assert adapter_configs(model) == {name: config for name, (config, _) in spec.adapters.items()}
    assert (active_adapter(model), merged_adapter(model)) == (spec.active, spec.merged)
    fresh = build(spec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in fresh.named_parameters() if p.requires_grad}
    with torch.no_grad():
        got, want = model.eval()(x), fresh(x)
    assert relative_error(got, want) < 1e-5


def step(rng, model, spec, folders, x, tmp_path, counter):
    names = list(spec.adapters)
    kinds = list(CONFIGS)
    op = rng.choice(["inject", "inject", "set", "disable", "routing", "merge", "unmerge", "delete", "save",
                     "load", "load_refused", "train"])
    if op == "inject" or not names:
        kind = rng.choice(kinds)
        name = f"{kind}{next(counter)}"
        add(model, name, CONFIGS[kind])
        spec.adapters[name] = (CONFIGS[kind], name)
        spec.active, spec.merged = name, None
    elif op == "set":
        name = rng.choice(names)
        set_adapter(model, name)
        spec.merged = spec.merged if spec.merged == name else None
        spec.active = name
    elif op == "disable":
        base = vit().eval()
        with torch.no_grad(), disable_adapters(model):
            assert relative_error(model.eval()(x), base(x)) < 1e-5
    elif op == "routing":
        plain = [n for n in names if spec.adapters[n][0] in (CONFIGS["plain"], CONFIGS["other"])]
        if plain:
            chosen = [rng.choice(plain) for _ in range(x.shape[0])]
            flags = {n: p.requires_grad for n, p in model.named_parameters()}
            with torch.no_grad(), task_routing(model, chosen):
                mixed = model.eval()(x)
            assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
            for b, name in enumerate(chosen):
                alone = build(Spec(dict(spec.adapters), name, None))
                with torch.no_grad():
                    assert relative_error(mixed[b:b + 1], alone(x[b:b + 1])) < 1e-4
    elif op == "merge":
        if spec.active is not None and isinstance(spec.adapters[spec.active][0], LoraConfig):
            merge_adapters(model)
            spec.merged = spec.active
        else:
            with pytest.raises(ValueError):
                merge_adapters(model)
    elif op == "unmerge":
        unmerge_adapters(model)
        spec.merged = None
    elif op == "delete":
        name = rng.choice(names)
        delete_adapter(model, name)
        config, _ = spec.adapters.pop(name)
        spec.merged = None if spec.merged == name else spec.merged
        spec.active = None if spec.active == name else spec.active
    elif op == "save":
        name = rng.choice(names)
        folders.append((save_adapters(model, tmp_path / f"save{next(counter)}", name), spec.adapters[name]))
    elif op == "load" and folders:
        folder, (config, origin) = rng.choice(folders)
        name = rng.choice(names + [f"loaded{next(counter)}"])
        if name in spec.adapters and spec.adapters[name][0] != config:
            with pytest.raises(ValueError, match="were built from"):
                load_adapters(model, folder, name=name)
        else:
            load_adapters(model, folder, name=name)
            spec.merged = None  # it unmerges name, and makes name active (which unmerges any other)
            spec.adapters[name] = (config, origin)
            spec.active = name
    elif op == "load_refused" and folders:
        folder, _ = rng.choice(folders)
        broken = tmp_path / f"broken{next(counter)}"
        broken.mkdir()
        for file in folder.iterdir():
            (broken / file.name).write_bytes(file.read_bytes())
        meta = json.loads((broken / "adapter_config.json").read_text())
        field = "channel_rank" if "channel_rank" in meta["config"] else "rank"
        meta["config"][field] += 1
        (broken / "adapter_config.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="has shape"):
            load_adapters(model, broken, name=f"broken{next(counter)}")
    elif op == "train" and spec.merged is None:
        model.train()
        loss = model(x).square().mean() + model_aux_loss(model)
        running = spec.active is not None and getattr(spec.adapters[spec.active][0], "experts", 1) > 1
        assert (model_aux_loss(model).item() > 0) == running
        loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.slow
def test_random_call_sequences_agree_with_a_fresh_model(tmp_path, seed):
    import itertools

    rng = random.Random(seed)
    model, spec, folders, counter = vit().eval(), Spec(), [], itertools.count()
    x = images()
    for _ in range(14):
        step(rng, model, spec, folders, x, tmp_path, counter)
        check(model, spec, x)
