"""AdapterConfig: the presets against the configs of the official Adapter+ code (Steitz & Roth,
"Adapters Strike Back", CVPR 2024, github.com/visinf/adapter_plus), validation of every field at
construction, and the to_dict/from_dict round trip. No model is built."""

import dataclasses
import json

import pytest

from fused_adapters.adapters import AdapterConfig
from fused_adapters.kernels.checks import MAX_RANK
from fused_adapters.kernels.sparse.configs import MAX_EXPERTS

ADAPTER_FIELDS = ("rank", "position", "activation", "scaling", "init", "drop_path", "dropout", "norm", "bias")

# Official keys -> fields: dim -> rank, config -> position, act_layer: true -> "gelu" (the ViT's
# nn.GELU), scaling (1.0 | channel | learned -> "layer"), init, drop_path, dropout, norm_layer ->
# norm, bias, train.train_ln -> train_norms. conf/adapter/base_adapter.yaml holds the defaults
# (dim 8, act_layer true, norm_layer false, bias true, init houlsby, scaling 1.0, dropout 0,
# drop_path 0.1) and every experiment starts from conf/adapter/adapter_plus.yaml.
OFFICIAL = {
    # conf/adapter/adapter_plus.yaml (on base_adapter.yaml): config post, scaling channel
    "adapter_plus": dict(rank=8, position="post", activation="gelu", scaling="channel", init="houlsby",
                         drop_path=0.1, dropout=0.0, norm=False, bias=True, train_norms=False),
    # conf/adapter/houlsby.yaml and conf/experiment/ablations/other_configs/houlsby_dim8.yaml:
    # config houlsby, attn_adapter true, scaling 1.0, norm_layer false, init houlsby, train.train_ln true
    "houlsby": dict(rank=8, position="houlsby", activation="gelu", scaling=1.0, init="houlsby",
                    drop_path=0.1, dropout=0.0, norm=False, bias=True, train_norms=True),
    # conf/experiment/ablations/other_configs/pfeiffer.yaml: config pfeiffer, scaling 1.0,
    # norm_layer true, init bert (act_layer true from the base: GELU, not ReLU)
    "pfeiffer": dict(rank=8, position="pfeiffer", activation="gelu", scaling=1.0, init="bert",
                     drop_path=0.1, dropout=0.0, norm=True, bias=True, train_norms=False),
    # conf/adapter/parallel.yaml and conf/experiment/ablations/position/parallel-adapter.yaml:
    # config parallel, scaling 1.0 (no learned scale), norm_layer false, init houlsby
    "parallel": dict(rank=8, position="parallel", activation="gelu", scaling=1.0, init="houlsby",
                     drop_path=0.1, dropout=0.0, norm=False, bias=True, train_norms=False),
    # conf/experiment/ablations/other_configs/adaptformer.yaml: dim 8, config parallel,
    # scaling 0.1, norm_layer false, init lora
    "adaptformer": dict(rank=8, position="parallel", activation="gelu", scaling=0.1, init="lora",
                        drop_path=0.1, dropout=0.0, norm=False, bias=True, train_norms=False),
}


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_preset_matches_the_official_config(preset):
    config = getattr(AdapterConfig, preset)()
    got = {name: getattr(config, name) for name in OFFICIAL[preset]}
    assert got == OFFICIAL[preset]
    # the presets are plain (dense) adapters that keep the head trainable
    assert (config.experts, config.train_head) == (1, True)


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_preset_docstring_cites_its_official_file(preset):
    doc = getattr(AdapterConfig, preset).__doc__
    assert "official Adapter+ code" in doc and ".yaml" in doc


def test_adapter_plus_is_the_default():
    assert AdapterConfig.adapter_plus() == AdapterConfig()


def test_presets_differ_where_the_official_configs_do():
    # parallel: no channel scale; pfeiffer: the ViT's GELU, not ReLU
    assert AdapterConfig.parallel().scaling == 1.0
    assert AdapterConfig.pfeiffer().activation == "gelu"
    # AdaptFormer: parallel like parallel(), but a constant 0.1 scale and LoRA init
    adaptformer, parallel = AdapterConfig.adaptformer(), AdapterConfig.parallel()
    diff = {f.name for f in dataclasses.fields(AdapterConfig)
            if getattr(adaptformer, f.name) != getattr(parallel, f.name)}
    assert diff == {"scaling", "init"}


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_preset_overrides(preset):
    make = getattr(AdapterConfig, preset)
    config = make(rank=4, drop_path=0.0, train_head=False, train_norms=not OFFICIAL[preset]["train_norms"])
    assert (config.rank, config.drop_path, config.train_head) == (4, 0.0, False)
    assert config.train_norms is not OFFICIAL[preset]["train_norms"]
    for name in ADAPTER_FIELDS:
        if name not in ("rank", "drop_path"):
            assert getattr(config, name) == OFFICIAL[preset][name], name
    # houlsby_dim4.yaml is houlsby at rank 4; conf/adapter/pfeiffer.yaml alone keeps Houlsby init
    assert AdapterConfig.houlsby(rank=4).rank == 4
    with pytest.raises(ValueError, match="AdapterConfig.rank"):
        make(rank=0)
    with pytest.raises(TypeError):
        make(not_a_field=1)


@pytest.mark.parametrize("rank", [1, 2, 8, 64, 255, MAX_RANK])
def test_rank_accepted(rank):
    assert AdapterConfig(rank=rank).rank == rank


def test_rank_limit_is_the_kernels():
    assert MAX_RANK == 256


@pytest.mark.parametrize("rank", [0, -1, 257, 300, True, False, 2.0, 8.5, "8", None])
def test_rank_rejected(rank):
    with pytest.raises(ValueError, match=r"AdapterConfig\.rank .*1 to 256"):
        AdapterConfig(rank=rank)


@pytest.mark.parametrize("field, value", [
    ("position", "middle"), ("position", None), ("position", ["post"]),
    ("activation", "tanh"), ("activation", None), ("activation", "GELU"),
    ("scaling", "row"), ("scaling", "learned"), ("scaling", True), ("scaling", float("inf")),
    ("scaling", float("nan")), ("scaling", [1.0]),
    ("init", "xavier"), ("init", None),
    ("drop_path", 1.0), ("drop_path", -0.1), ("drop_path", True), ("drop_path", "0.1"), ("drop_path", float("nan")),
    ("dropout", 1.0), ("dropout", -0.5), ("dropout", None),
    ("norm", 1), ("norm", "yes"), ("norm", None),
    ("bias", 0), ("bias", "false"),
    ("train_head", 1), ("train_head", None),
    ("train_norms", 1), ("train_norms", "True"), ("train_norms", None),
    ("noisy_gating", "yes"), ("noisy_gating", 0),
    ("experts", 0), ("experts", MAX_EXPERTS + 1), ("experts", 2.0), ("experts", True),
    ("top_k", 0), ("top_k", 2), ("top_k", 1.0), ("top_k", True),
    ("routing", "image"), ("routing", None),
    ("aux_loss_weight", -1.0), ("aux_loss_weight", float("inf")), ("aux_loss_weight", True),
    ("aux_loss_weight", "0.01"),
])
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"AdapterConfig\.{field}\b"):
        AdapterConfig(**{field: value})


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_presets_validate_overrides(preset):
    with pytest.raises(ValueError, match=r"AdapterConfig\.train_norms"):
        getattr(AdapterConfig, preset)(train_norms="yes")
    with pytest.raises(ValueError, match=r"AdapterConfig\.rank"):
        getattr(AdapterConfig, preset)(rank=257)


def test_mixture_fields():
    config = AdapterConfig(experts=MAX_EXPERTS, top_k=MAX_EXPERTS, routing="sample", aux_loss_weight=0,
                           noisy_gating=True)
    assert config.sparse and config.aux_loss_weight == 0.0 and isinstance(config.aux_loss_weight, float)
    with pytest.raises(ValueError, match=r"AdapterConfig\.top_k"):
        AdapterConfig(experts=4, top_k=5)
    # A mixture's experts take dropout inside the fused op too.
    assert AdapterConfig(experts=2, dropout=0.1).dropout == 0.1


def test_good_values_are_kept():
    config = AdapterConfig(scaling=None, drop_path=0, dropout=0.5, norm=True, bias=False)
    assert config.scaling is None and config.norm and not config.bias
    assert isinstance(config.drop_path, float) and config.drop_path == 0.0
    assert AdapterConfig(scaling=2).scaling == 2.0 and isinstance(AdapterConfig(scaling=2).scaling, float)
    assert AdapterConfig(scaling="layer").scaling == "layer"
    for activation in ("gelu", "gelu_tanh", "relu", "silu", "identity"):
        assert AdapterConfig(activation=activation).activation == activation


def test_train_norms_default_and_round_trip():
    assert AdapterConfig().train_norms is False
    names = [f.name for f in dataclasses.fields(AdapterConfig)]
    assert names.index("train_norms") == names.index("train_head") + 1
    for config in (AdapterConfig(train_norms=True), AdapterConfig.houlsby(), AdapterConfig.adaptformer(rank=16)):
        data = config.to_dict()
        assert data["train_norms"] is config.train_norms
        again = AdapterConfig.from_dict(json.loads(json.dumps(data)))  # as saved in adapter_config.json
        assert again == config


def test_from_dict_without_train_norms():
    # a config saved before train_norms existed
    old = {"rank": 8, "position": "houlsby", "activation": "gelu", "scaling": 1.0, "init": "houlsby",
           "drop_path": 0.1, "dropout": 0.0, "norm": False, "bias": True, "train_head": True, "experts": 1,
           "top_k": 1, "routing": "token", "aux_loss_weight": 0.01, "noisy_gating": False}
    config = AdapterConfig.from_dict(old)
    assert config.train_norms is False
    assert {k: getattr(config, k) for k in old} == old


def test_from_dict_rejects_unknown_and_bad_fields():
    with pytest.raises(ValueError, match="unknown AdapterConfig fields"):
        AdapterConfig.from_dict({"rank": 8, "attn_adapter": True})
    with pytest.raises(ValueError, match=r"AdapterConfig\.rank"):
        AdapterConfig.from_dict({"rank": 300})
    with pytest.raises(ValueError, match=r"AdapterConfig\.train_norms"):
        AdapterConfig.from_dict({"train_norms": "false"})


def test_frozen():
    config = AdapterConfig.houlsby()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train_norms = False
    assert dataclasses.replace(config, train_norms=False).train_norms is False
    with pytest.raises(ValueError, match=r"AdapterConfig\.rank"):
        dataclasses.replace(config, rank=0)
