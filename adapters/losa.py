"""Low-rank side adaptation (LoSA: Mercea, Gritsenko, Schmid, Arnab, "Time-, Memory- and
Parameter-Efficient Visual Adaptation", CVPR 2024, arXiv 2402.02887) for timm ViTs.

What follows the paper: the frozen backbone runs without autograd (no activation of it is kept
for backward, and no gradient enters it); a light network in parallel takes the backbone's
features at every block and iteratively refines them with low-rank mixers that alternate
between the channel and the token dimension; only that side network (and the head) trains, and
the head classifies from its output.

Where the paper's text leaves the details open (its code is not public), this package chose:

- The side network carries a correction delta of the backbone's features. With h_1..h_L the
  outputs of the blocks that feed it (all blocks by default) and delta_0 = 0, block i refines
  z_i = h_i + delta_{i-1}:

      u_i       = z_i + s_c * channel_mixer_i(z_i)        (a bottleneck over D, rank channel_rank)
      z_{i+1}   = u_i + s_t * token_mixer_i(u_i) + (h_{i+1} - h_i)
                                                         (a bottleneck over the N tokens, rank token_rank)

  so delta_i = delta_{i-1} + (both mixers' updates), and the output is h_L + delta_L, which goes
  through the backbone's final norm and the head. Up-projections start at zero ("lora" init),
  so a fresh side network outputs h_L exactly: training starts from the linear probe.
- Each mixer is Adapter+'s bottleneck (GELU, biases, a learnable channel-wise scale s_c [D] or
  s_t [N], stochastic depth per image), one call of the fused bottleneck op: no LayerNorm
  inside the side network.
- The token mixer mixes all N tokens, the class token included; N is fixed at inject, by the
  model's configured image size (other sizes get a ValueError, dynamic_img_size or not).

Layout: the side network keeps its state token-major, [N, B, D]. The channel mixer reads it as
[N*B, D] rows; the token mixer reads the same storage as [(B, D), N] rows (column stride B*D),
and the op writes its output, and backward its input's gradient, in that layout too (laid out
like x), so neither mixer copies the state into a transposed layout, forward or backward. The
backbone feature enters through the token mixer's residual terms (h_{i+1} - h_i, computed
without autograd and written token-major in one pass), so adding it costs no op on the state of
its own. Counted (interpreter byte counter, ViT-B
widths, fp16, batch 2): the forward moves about 8.2 M x D passes a block that is followed by
another fed feature (each mixer 2, the feature's difference 3 and its read as a residual term
1) against 10 with a separate add after the token mixer, 4.2 for the last fed block, and 2 more
once for the first feature's token-major copy; the backward about 8.3 a block, with no aten op
of its own (3 blocks: 22.6 passes forward, 25.0 backward). Per fed block, backward keeps the two
mixers' inputs (2 x M x D) and their pre-activations ([N*B, channel_rank] and [B*D,
token_rank]).

The backbone runs block by block, interleaved with the side network, so only two of its
features are alive at a time. Its features can also be computed once (losa_features) and the
side network run from them (losa_logits), with the same result as model(images), for training
many epochs on a fixed dataset without augmentation.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..kernels import bottleneck_adapter, reference
from .config import LosaConfig
from .kinds import AdapterKind, Built, register_kind
from .modules import drop_path_scale, init_projections
from .record import record_of
from .surgery import Swapped, block_dim, swap_in, swap_out, vit_blocks

__all__ = ["LosaConfig", "LosaMixer", "LosaSideNetwork", "LosaKind", "losa_features", "losa_logits"]

class LosaMixer(nn.Module):
    """One low-rank mixer over a width W (D for a channel mixer, N for a token mixer): w_down
    [r, W], b_down [r], w_up [W, r], b_up [W], a channel-wise scale [W] (ones). Its update of
    rows x [M, W] is scale * row_scale * (gelu(x w_down^T + b_down) w_up^T + b_up)."""

    def __init__(self, width: int, rank: int, init: str = "lora", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.width, self.rank, self.init = width, rank, init
        self.w_down = nn.Parameter(torch.empty(rank, width, **factory))
        self.b_down = nn.Parameter(torch.empty(rank, **factory))
        self.w_up = nn.Parameter(torch.empty(width, rank, **factory))
        self.b_up = nn.Parameter(torch.empty(width, **factory))
        self.scale = nn.Parameter(torch.empty(width, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_projections(self.init, self.w_down, self.b_down, self.w_up, self.b_up)
        with torch.no_grad():
            nn.init.ones_(self.scale)

    def extra_repr(self) -> str:
        return f"width={self.width}, rank={self.rank}, init={self.init}"

    def forward(self, x: torch.Tensor, residual, row_scale: Optional[torch.Tensor], fused: bool = True):
        fn = bottleneck_adapter if fused else reference.bottleneck_adapter
        return fn(x, self.w_down, self.b_down, self.w_up, self.b_up, self.scale, activation="gelu",
                  residual=residual, row_scale=row_scale)


class LosaSideNetwork(nn.Module):
    """The side network of one LoSA adapter: a channel mixer (over D) and a token mixer (over
    the N tokens) per fed block. forward(features) takes the fed blocks' outputs h_1..h_L, each
    [B, N, D] and without gradient (a sequence, or an iterator the backbone fills as it runs),
    and returns h_L + delta_L as [B, N, D] (a token-major view; see the module docstring)."""

    def __init__(self, dim: int, tokens: int, blocks: Sequence[int], config: LosaConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dim, self.tokens, self.blocks = dim, tokens, tuple(blocks)
        self.drop_path = config.drop_path
        self.channel = nn.ModuleList(LosaMixer(dim, config.channel_rank, config.init, **factory) for _ in blocks)
        self.token = nn.ModuleList(LosaMixer(tokens, config.token_rank, config.init, **factory) for _ in blocks)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, tokens={self.tokens}, blocks={list(self.blocks)}, drop_path={self.drop_path}"

    def forward(self, features: Iterable[torch.Tensor], fused: bool = True) -> torch.Tensor:
        """fused=False runs every mixer as the plain-PyTorch reference on contiguous copies of the
        transposed views: the same math, the spec the fused path is tested against."""
        iterator = iter(features)
        current = self._check(next(iterator, None), 0).detach()
        batch = current.shape[0]
        with torch.no_grad():
            state = current.transpose(0, 1).contiguous()  # z_1 = h_1, token-major
        count = len(self.channel)
        for index in range(count):
            upcoming = next(iterator, None) if index + 1 < count else None
            delta = None
            if upcoming is not None:
                upcoming = self._check(upcoming, index + 1, batch).detach()
                with torch.no_grad():  # h_{i+1} - h_i, written token-major: one pass, no copy of either
                    delta = torch.empty_like(state)
                    torch.sub(upcoming.transpose(0, 1), current.transpose(0, 1), out=delta)
            state = self._step(index, state, delta, fused)
            current = upcoming
        if next(iterator, None) is not None:
            raise ValueError(f"the side network takes {count} block features; more were given")
        return state.transpose(0, 1)

    def _check(self, feature, index: int, batch: Optional[int] = None) -> torch.Tensor:
        if feature is None:
            raise ValueError(f"the side network takes {len(self.channel)} block features (blocks {list(self.blocks)}); "
                             f"got {index}")
        if feature.dim() != 3 or feature.shape[1:] != (self.tokens, self.dim):
            raise ValueError(f"block feature {index} must have shape [B, N, D] = [B, {self.tokens}, {self.dim}] (the "
                             f"side network was built for {self.tokens} tokens per image: the model's configured "
                             f"image size), got {tuple(feature.shape)}")
        if batch is not None and feature.shape[0] != batch:
            raise ValueError(f"block feature {index} has batch {feature.shape[0]}, block feature 0 has {batch}: every "
                             f"block feature must come from the same images")
        return feature

    def _step(self, index: int, state: torch.Tensor, delta: Optional[torch.Tensor], fused: bool) -> torch.Tensor:
        tokens, batch, dim = state.shape
        # One keep/drop draw per image and mixer (the update's rows of that image share it).
        keep = drop_path_scale(state.new_empty((batch, 1)), self.drop_path, self.training)
        # Channel mixer: rows (n, b) of the token-major state.
        mixed = self.channel[index](state, residual=state, row_scale=None if keep is None else keep.repeat(tokens),
                                    fused=fused)
        # Token mixer: rows (b, d), columns n, of the same storage (column stride B * D); the
        # backbone's next feature joins through the residual terms.
        keep = drop_path_scale(state.new_empty((batch, 1)), self.drop_path, self.training)
        view = mixed.permute(1, 2, 0)
        delta_view = None if delta is None else delta.permute(1, 2, 0)
        if not fused:  # the reference, on row-major copies
            view = view.contiguous()
            delta_view = None if delta_view is None else delta_view.contiguous()
        out = self.token[index](view, residual=view if delta_view is None else (view, delta_view),
                                row_scale=None if keep is None else keep.repeat_interleave(dim), fused=fused)
        # Fused, y is laid out like its input: this permute is the contiguous [N, B, D] state.
        return out.permute(2, 0, 1) if fused else out.permute(2, 0, 1).contiguous()


def _stem(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def backbone_features(model: nn.Module, images: torch.Tensor, blocks: Sequence[int]) -> Iterator[torch.Tensor]:
    """The outputs of `blocks` (increasing indices) of the backbone for images, one at a time as
    the backbone runs, each computed without autograd. Nothing past the last fed block runs."""
    wanted = set(blocks)
    last = max(blocks)
    with torch.no_grad():
        x = _stem(model, images)
    for index, block in enumerate(model.blocks):
        if index > last:
            break
        with torch.no_grad():  # never across a yield: the consumer's ops must record autograd
            x = block(x)
        if index in wanted:
            yield x


def losa_features(model: nn.Module, images: torch.Tensor, name: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The backbone's features that the active LoSA adapter is fed, computed once: [L, B, N, D]
    for its L fed blocks, without autograd, in `dtype` (default the backbone's). Store them per
    image (features[:, i]) and train from them with losa_logits: the backbone never runs again.
    Holds L x B x N x D values (ViT-B/16, 224 px, all 12 blocks: 3.6 MB per image in fp16), so
    compute them in batches. `name`, if given, must be the active adapter (set_adapter): the
    backbone runs as the model is set, and with another adapter active (a LoRA adapter, merged or
    not, or a bottleneck one) its features would not be the ones the side network is fed."""
    side = _side_network(model, name)
    feats = [f if dtype is None else f.to(dtype) for f in backbone_features(model, images, side.blocks)]
    return torch.stack(feats)


def losa_logits(model: nn.Module, features: torch.Tensor, name: Optional[str] = None) -> torch.Tensor:
    """What model(images) returns, from features = losa_features(model, images): the active LoSA
    adapter's side network, the backbone's final norm and the head (the adapter's own head when
    it trains one). `name`, if given, must be the active adapter, as for losa_features."""
    side = _side_network(model, name)
    if features.dim() != 4 or features.shape[0] != len(side.blocks):
        raise ValueError(f"features must have shape [L, B, N, D] with L = {len(side.blocks)} fed blocks, "
                         f"got {tuple(features.shape)}")
    dtype = next(side.parameters()).dtype
    out = side([f.to(dtype) for f in features.unbind(0)])
    return model.forward_head(model.norm(out))


def _side_network(model: nn.Module, name: Optional[str]) -> LosaSideNetwork:
    """The active LoSA adapter's side network. The backbone and the head run as the model is set,
    so `name` (if given) must be that adapter: anything else would mix another adapter's backbone
    or head with this side network."""
    networks = getattr(model, "losa", None)
    names = sorted(networks) if isinstance(networks, nn.ModuleDict) else []
    if not names:
        raise ValueError("this model has no LoSA adapter; inject(model, LosaConfig(), name=...) adds one")
    if name is not None and name not in names:
        raise ValueError(f"name: no LoSA adapter named {name!r} in this model; LoSA adapters: {names}")
    record = record_of(model)
    running = record.running
    if running not in names or (name is not None and name != running):
        wanted = name if name is not None else (names[0] if len(names) == 1 else "<name>")
        now = record.active
        state = f"{now!r} (inside {record.frames[-1].owner})" if record.frames else repr(now)
        raise ValueError(f"name: the LoSA adapter {wanted!r} must be the active adapter, since the backbone and the "
                         f"head run as the model is set (active now: {state}); call set_adapter(model, {wanted!r}) "
                         f"first")
    return networks[running]


def token_count(model: nn.Module) -> int:
    """N, the tokens per image of a timm ViT at its configured image size (a model built with
    dynamic_img_size takes other sizes too, but a LoSA adapter's token mixers have one weight per
    token: other sizes get a ValueError naming the token counts)."""
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if not isinstance(patches, int):
        raise TypeError(f"LoSA needs a timm ViT whose patch_embed has num_patches; {type(model).__name__} has none")
    return patches + int(getattr(model, "num_prefix_tokens", 0) or 0)


class LosaModelMixin(Swapped):
    """Put before a timm VisionTransformer class in the MRO: while the record runs a LoSA adapter,
    forward_features runs the backbone without autograd, block by block, feeding the side
    network, and returns the backbone's final norm of its output; forward_head (pooling, head)
    is the model's own."""

    swap_prefix = "Losa"

    def forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_record.running
        if name is None or name not in self.losa:
            return super().forward_features(x, *args, **kwargs)
        if args or any(value is not None and value is not False for value in kwargs.values()):
            raise TypeError("a LoSA adapter runs the backbone block by block, without attention masks or causal "
                            f"attention; forward_features got {len(args)} extra arguments and {sorted(kwargs)}")
        side = self.losa[name]
        return self.norm(side(backbone_features(self, x, side.blocks)))


class LosaKind(AdapterKind):
    """A LoSA side network beside the frozen backbone (LosaConfig); the model's class gets the
    LoSA forward_features while it has one."""

    file_kind = "losa"
    config_class = LosaConfig
    noun = "a LoSA side network"

    def build(self, model, name, config, record) -> Built:
        blocks = vit_blocks(model)
        for part in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "norm", "forward_head"):
            if not hasattr(model, part):
                raise TypeError(f"LoSA needs a timm VisionTransformer (with {part}); {type(model).__name__} has none")
        tokens = token_count(model)
        indices = config.block_indices(len(blocks))
        reference_param = next(blocks[0].parameters())
        side = LosaSideNetwork(block_dim(blocks[0]), tokens, indices, config, device=reference_param.device,
                               dtype=reference_param.dtype)

        def attach():
            if not isinstance(model, LosaModelMixin):
                swap_in(model, LosaModelMixin)
                model.losa = nn.ModuleDict()
            model.losa[name] = side

        return Built({"losa": side}, attach)

    def modules(self, model, name) -> dict:
        networks = getattr(model, "losa", None)
        return {"losa": networks[name]} if isinstance(model, LosaModelMixin) and name in networks else {}

    def remove(self, model, name) -> None:
        if isinstance(model, LosaModelMixin) and name in model.losa:
            del model.losa[name]
            if not len(model.losa):
                del model.losa
                swap_out(model)

    def summary(self, model, name, config) -> str:
        return (f"LoSA side network on {len(model.losa[name].blocks)} blocks, channel rank {config.channel_rank}, "
                f"token rank {config.token_rank}")

    def model_info(self, model, config) -> dict:
        return {"tokens": token_count(model)}

    def check_model_info(self, saved, current, source) -> None:
        if "tokens" in saved and saved["tokens"] != current["tokens"]:
            raise ValueError(f"the LoSA adapter in {source} was saved for {saved['tokens']} tokens per image; this "
                             f"model has {current['tokens']} (another image or patch size)")

    def merge_refusal(self, name, config):
        return (f"cannot merge adapter {name!r}: it is a LoSA side network, a network of its own beside the "
                f"backbone, not a low-rank update of a linear's weight; only LoRA adapters merge")


register_kind(LosaKind())
