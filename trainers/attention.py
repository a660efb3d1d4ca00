"""Capture of cross-attention queries, keys and probabilities: the project's one capture mechanism.

Built the way diffusers builds attention variants: a small processor object
(:class:`CaptureCrossAttnProcessor`) is swapped in on the chosen cross-attention (``attn2``) layers
with ``unet.set_attn_processor``; every other layer gets diffusers' SDPA processor
(``AttnProcessor2_0``). Nothing in the model is forked or copied, so LoRA layers (peft) wrapped
around ``to_q`` / ``to_k`` / ``to_v`` / ``to_out`` apply as usual.

What is recorded, per layer and per call, goes into an :class:`AttentionStore`, and only what the
store asks for:

* ``query`` (B, heads, N_img, d): the projected image features (after ``norm_q`` when the layer has one);
* ``key``   (B, heads, N_txt, d): the projected text tokens (after ``norm_k``);
* ``probs`` (B, heads, N_img, N_txt): softmax(Q K^T * scale) (+ mask), the explicit attention
  probabilities. Only when they are asked for does the layer compute attention explicitly; otherwise
  it runs SDPA, exactly like ``AttnProcessor2_0``.

Typical use::

    store = AttentionStore(query=True, key=True, probs=True)
    with capture_cross_attention(unet, store):
        eps = unet(x_t, t, encoder_hidden_states=emb).sample   # store cleared at each UNet forward
    a = store.maps()                         # {layer: (B, N_img, T)}, heads averaged
    a64 = store.mean_map(64)                 # (B, 64*64, T), every layer resized to 64x64, averaged

Layer names are the diffusers processor keys without the ``.processor`` suffix, e.g.
``up_blocks.1.attentions.0.transformer_blocks.0.attn2``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

LayerFilter = Callable[[str], bool] | str | Iterable[str] | None

_SUFFIX = ".processor"
_TRANSFORMER_PARENT = re.compile(r"^(.*)\.transformer_blocks\.\d+\.attn2$")


def _layer_name(key: str) -> str:
    return key[: -len(_SUFFIX)] if key.endswith(_SUFFIX) else key


def is_cross_attention_layer(name: str) -> bool:
    """True for the cross-attention layers of SD-style UNets (``...attn2`` / ``...attn2.processor``)."""
    return _layer_name(name).endswith("attn2")


def _matcher(layer_filter: LayerFilter) -> Callable[[str], bool]:
    """None: everything; callable: a predicate on the layer name; str: substring; iterable: names."""
    if layer_filter is None:
        return lambda name: True
    if callable(layer_filter):
        return layer_filter
    if isinstance(layer_filter, str):
        return lambda name: layer_filter in name
    wanted = {_layer_name(n) for n in layer_filter}
    return lambda name: name in wanted


def _in_backward() -> bool:
    # Gradient checkpointing re-runs blocks during backward; those re-runs must not overwrite what the
    # forward recorded (the loss was computed from it). Private torch API, hence the guard.
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def spatial_size(n_img: int, latent_hw: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """(h, w) of a layer with ``n_img`` image tokens.

    With the latent size (H, W): halve with ceil (a stride-2, padding-1 conv, as in SD's UNet) until
    h * w == n_img. Otherwise, or when no level matches: a square if n_img is a perfect square, else None.
    """
    if latent_hw is not None:
        h, w = int(latent_hw[0]), int(latent_hw[1])
        while h * w > n_img and (h > 1 or w > 1):
            h, w = -(-h // 2), -(-w // 2)
        if h * w == n_img:
            return h, w
    s = math.isqrt(n_img)
    return (s, s) if s * s == n_img else None


@dataclass
class CrossAttnRecord:
    """One cross-attention call of one layer. Tensors not asked for are None."""

    name: str
    hw: tuple[int, int] | None  # spatial size of the layer's image tokens (N_img = h * w)
    heads: int
    scale: float  # the softmax scale used (1/sqrt(d) in SD)
    query: torch.Tensor | None = None  # (B, heads, N_img, d)
    key: torch.Tensor | None = None  # (B, heads, N_txt, d)
    probs: torch.Tensor | None = None  # (B, heads, N_img, N_txt)
    hidden: torch.Tensor | None = None  # (B, N_img, C): the layer's input features, what ``to_q`` projects


class AttentionStore:
    """Where :class:`CaptureCrossAttnProcessor` records cross-attention tensors.

    Args:
        query, key, probs: which tensors to record (only these are kept; ``probs=False`` also means
            the captured layers run SDPA instead of explicit attention).
        hidden: record the layer's input features (the UNet's image features entering cross-attention,
            after the layer's own group norm if any: exactly what ``to_q`` projects), (B, N_img, C).
        keep_grad: store tensors attached to the autograd graph (so a loss on them trains the model);
            False stores detached tensors. Under ``torch.no_grad`` they carry no graph either way.
        dtype: cast stored tensors to this dtype (e.g. ``torch.float16`` to halve their memory); the
            cast is differentiable.
        auto_reset: clear the store at the start of each forward of a UNet it is installed on.
        latent_size: (H, W) of the latent, used to derive layers' (h, w) when the processor is used
            outside :func:`install_capture` (which learns it from each forward).
    """

    def __init__(
        self,
        *,
        query: bool = False,
        key: bool = False,
        probs: bool = True,
        hidden: bool = False,
        keep_grad: bool = True,
        dtype: torch.dtype | None = None,
        auto_reset: bool = True,
        latent_size: tuple[int, int] | None = None,
    ):
        self.save_query = query
        self.save_key = key
        self.save_probs = probs
        self.save_hidden = hidden
        self.keep_grad = keep_grad
        self.dtype = dtype
        self.auto_reset = auto_reset
        self.latent_size = tuple(latent_size) if latent_size is not None else None
        self.enabled = True
        self.records: dict[str, list[CrossAttnRecord]] = {}

    # ------------------------------------------------------------------ recording

    def reset(self) -> None:
        self.records = {}

    def begin_forward(self, latent_hw: tuple[int, int] | None = None) -> None:
        """Called at the start of each UNet forward (by the hook :func:`install_capture` adds)."""
        if latent_hw is not None:
            self.latent_size = (int(latent_hw[0]), int(latent_hw[1]))
        if self.auto_reset:
            self.reset()

    @property
    def wants_anything(self) -> bool:
        return self.enabled and (self.save_query or self.save_key or self.save_probs or self.save_hidden)

    def _keep(self, t: torch.Tensor | None, wanted: bool) -> torch.Tensor | None:
        if not wanted or t is None:
            return None
        if not self.keep_grad:
            t = t.detach()
        if self.dtype is not None and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t

    def record(self, name, *, heads, scale, hw, query=None, key=None, probs=None, hidden=None) -> None:
        rec = CrossAttnRecord(
            name=name,
            hw=hw,
            heads=heads,
            scale=scale,
            query=self._keep(query, self.save_query),
            key=self._keep(key, self.save_key),
            probs=self._keep(probs, self.save_probs),
            hidden=self._keep(hidden, self.save_hidden),
        )
        self.records.setdefault(name, []).append(rec)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, name: str) -> bool:
        return name in self.records

    def __getitem__(self, name: str) -> CrossAttnRecord:
        return self.records[name][-1]

    def names(self, layer_filter: LayerFilter = None) -> list[str]:
        """Recorded layer names (UNet order of first call), optionally filtered."""
        match = _matcher(layer_filter)
        return [n for n in self.records if match(n)]

    def get(self, name: str, call: int = -1) -> CrossAttnRecord:
        """The record of ``name``'s ``call``-th call since the last reset (default: the latest)."""
        return self.records[name][call]

    def _field(self, field: str, layer_filter: LayerFilter, call: int) -> dict[str, torch.Tensor]:
        flag = {"query": self.save_query, "key": self.save_key, "probs": self.save_probs, "hidden": self.save_hidden}[field]
        if not flag:
            raise ValueError(f"this AttentionStore does not record {field!r} (AttentionStore({field}=True))")
        return {n: getattr(self.get(n, call), field) for n in self.names(layer_filter)}

    def queries(self, layer_filter: LayerFilter = None, call: int = -1) -> dict[str, torch.Tensor]:
        """{layer: (B, heads, N_img, d)}."""
        return self._field("query", layer_filter, call)

    def hiddens(self, layer_filter: LayerFilter = None, call: int = -1) -> dict[str, torch.Tensor]:
        """{layer: (B, N_img, C)}, the layers' input features."""
        return self._field("hidden", layer_filter, call)

    def keys(self, layer_filter: LayerFilter = None, call: int = -1) -> dict[str, torch.Tensor]:
        """{layer: (B, heads, N_txt, d)}."""
        return self._field("key", layer_filter, call)

    def maps(
        self, layer_filter: LayerFilter = None, reduce_heads: str | None = "mean", call: int = -1
    ) -> dict[str, torch.Tensor]:
        """{layer: attention probabilities}: (B, N_img, T) with ``reduce_heads="mean"`` (or "sum"),
        (B, heads, N_img, T) with ``reduce_heads=None``."""
        probs = self._field("probs", layer_filter, call)
        return {n: _reduce_heads(p, reduce_heads) for n, p in probs.items()}

    def resolution(self, name: str) -> tuple[int, int] | None:
        return self[name].hw

    def group_by_resolution(self, layer_filter: LayerFilter = None) -> dict[tuple[int, int], list[str]]:
        """{(h, w): [layer names]}, largest resolution last (dict in increasing h * w)."""
        groups: dict[tuple[int, int], list[str]] = {}
        for n in self.names(layer_filter):
            hw = self[n].hw
            if hw is None:
                raise ValueError(f"spatial size of layer {n!r} is unknown; set AttentionStore(latent_size=...)")
            groups.setdefault(hw, []).append(n)
        return dict(sorted(groups.items(), key=lambda kv: kv[0][0] * kv[0][1]))

    def grouped_maps(
        self, layer_filter: LayerFilter = None, reduce_heads: str | None = "mean", call: int = -1
    ) -> dict[tuple[int, int], torch.Tensor]:
        """{(h, w): the mean over that resolution's layers of their maps} (TokenCompose's groups, e.g.
        ``layer_filter=lambda n: not n.startswith("down_blocks")`` for mid 8 / up 16 / up 32 / up 64)."""
        maps = self.maps(layer_filter, reduce_heads, call)
        return {
            hw: torch.stack([maps[n] for n in names]).mean(0)
            for hw, names in self.group_by_resolution(layer_filter).items()
        }

    def mean_map(
        self,
        size: int | tuple[int, int],
        layer_filter: LayerFilter = None,
        layout: str = "flat",
        reduce_heads: str | None = "mean",
        call: int = -1,
    ) -> torch.Tensor:
        """Every selected layer's map resized to ``size`` (bilinear) and averaged over layers:
        (B, size*size, T) for ``layout="flat"``, (B, T, size, size) for ``"grid"`` (heads dims kept
        in front when ``reduce_heads=None``). SPF's layer-averaged A_base at 64 x 64 (eq. 6)."""
        maps = self.maps(layer_filter, reduce_heads, call)
        if not maps:
            raise ValueError("no recorded layer matches the filter")
        resized = [resize_maps(m, size, hw=self[n].hw, layout=layout) for n, m in maps.items()]
        return torch.stack(resized).mean(0)


def _reduce_heads(p: torch.Tensor, how: str | None) -> torch.Tensor:
    if how is None or how == "none":
        return p
    if how == "mean":
        return p.mean(1)
    if how == "sum":
        return p.sum(1)
    raise ValueError(f"reduce_heads must be 'mean', 'sum' or None, not {how!r}")


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_maps(
    maps: torch.Tensor,
    size: int | tuple[int, int],
    hw: tuple[int, int] | None = None,
    layout: str = "flat",
) -> torch.Tensor:
    """Bilinearly resize token maps (..., N_img, T) laid out row-major on an (h, w) grid.

    ``hw`` defaults to a square grid. Returns (..., H*W, T) for ``layout="flat"`` or (..., T, H, W)
    for ``layout="grid"``, (H, W) = ``size``. ``align_corners=False``; the same size is returned
    unchanged (no interpolation).
    """
    if layout not in ("flat", "grid"):
        raise ValueError(f"layout must be 'flat' or 'grid', not {layout!r}")
    *lead, n, t = maps.shape
    if hw is None:
        hw = spatial_size(n)
        if hw is None:
            raise ValueError(f"{n} image tokens is not a square grid; pass hw=(h, w)")
    h, w = hw
    if h * w != n:
        raise ValueError(f"hw={hw} does not match {n} image tokens")
    out_h, out_w = _size2(size)
    grid = maps.reshape(-1, h, w, t).permute(0, 3, 1, 2)  # (L, T, h, w)
    if (out_h, out_w) != (h, w):
        grid = F.interpolate(grid, size=(out_h, out_w), mode="bilinear", align_corners=False)
    if layout == "grid":
        return grid.reshape(*lead, t, out_h, out_w)
    return grid.permute(0, 2, 3, 1).reshape(*lead, out_h * out_w, t)


def attention_features(
    query: torch.Tensor, key: torch.Tensor, scale: float | None = None, tokens=None
) -> torch.Tensor:
    """F = Softmax(K Q^T * scale) Q (SPF eq. 3): per text token, the image-feature average weighted by
    that token's softmax over image positions. query (B, heads, N_img, d), key (B, heads, T, d) ->
    (B, heads, T_sel, d); ``tokens`` (index, slice or bool mask on T) selects the keys first.
    Runs as SDPA with the roles swapped (K attends to Q), so (B, heads, T, N_img) need not be kept."""
    if tokens is not None:
        key = key[:, :, tokens]
    if scale is None:
        scale = query.shape[-1] ** -0.5
    return F.scaled_dot_product_attention(key, query, query, scale=scale)


# ---------------------------------------------------------------------------------- processor


class CaptureCrossAttnProcessor:
    """Attention processor that records into ``store`` on cross-attention calls.

    q, k, v are formed exactly as in diffusers' ``AttnProcessor2_0`` (spatial_norm, group_norm,
    norm_cross, norm_q / norm_k, mask preparation, residual connection, rescale_output_factor).
    With ``explicit`` (default: the store records probabilities) the probabilities are computed
    explicitly (Q K^T in float32 when the layer sets ``upcast_attention``; the softmax always in
    float32, cast back to the query's dtype) and multiply V; otherwise SDPA runs. ``explicit`` is
    fixed at construction so that the operations never depend on the store: a gradient-checkpointing
    re-run inside backward repeats the forward's operations exactly and records nothing. Self-attention calls (no ``encoder_hidden_states``) are
    plain ``AttnProcessor2_0``; with no store, or a disabled one, nothing is recorded.
    """

    def __init__(self, store: AttentionStore | None, name: str, explicit: bool | None = None):
        self.store = store
        self.name = _layer_name(name)
        # Fixed here, not read from the store per call: a gradient-checkpointing re-run inside
        # backward must repeat the forward's exact operations, whatever store is installed by then.
        self.explicit = bool(store is not None and store.save_probs) if explicit is None else explicit
        self.hw: tuple[int, int] | None = None  # set per forward by install_capture's hook
        self._sdpa = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        store = self.store
        if encoder_hidden_states is None:
            return self._sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        record = store is not None and store.wants_anything and not _in_backward()
        if record and store.save_probs and not self.explicit:
            raise RuntimeError(
                f"{self.name}: the store asks for probabilities but this processor was installed with "
                "explicit=False (install_capture(..., explicit=True))"
            )

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            hw = (height, width)
        else:
            hw = None

        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        features = hidden_states  # what to_q projects (recorded as ``hidden``)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scale = float(attn.scale)
        probs = None
        if self.explicit:
            probs = _explicit_probs(attn, query, key, attention_mask, scale)
            out = torch.matmul(probs, value)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale)

        if record:
            n_img = query.shape[2]
            if hw is None:
                hw = self.hw if self.hw is not None and self.hw[0] * self.hw[1] == n_img else None
            if hw is None:
                hw = spatial_size(n_img, store.latent_size)
            store.record(self.name, heads=attn.heads, scale=scale, hw=hw, query=query, key=key, probs=probs,
                         hidden=features)

        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _explicit_probs(attn, query, key, mask, scale) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) over the text tokens, (B, heads, N_img, N_txt), in query's dtype."""
    dtype = query.dtype
    q, k = (query.float(), key.float()) if attn.upcast_attention else (query, key)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    # Softmax in float32 always (a no-op in fp32): SDPA kernels do the same internally, and half
    # precision maps would otherwise lose the small probabilities the losses compare.
    return scores.float().softmax(dim=-1).to(dtype)


# ---------------------------------------------------------------------------------- install


class CaptureHandle:
    """What :func:`install_capture` returns: the installed processors, and how to undo them."""

    def __init__(self, unet, saved: dict, processors: dict[str, CaptureCrossAttnProcessor], hooks: list):
        self.unet = unet
        self._saved = saved
        self.processors = processors  # {layer name: processor}
        self._hooks = hooks
        self.active = True

    @property
    def layers(self) -> list[str]:
        return list(self.processors)

    @property
    def store(self) -> AttentionStore | None:
        return next(iter(self.processors.values())).store if self.processors else None

    def set_store(self, store: AttentionStore | None) -> None:
        """Point every capture processor at ``store`` (None: capture nothing, plain SDPA)."""
        for p in self.processors.values():
            p.store = store

    @contextmanager
    def using(self, store: AttentionStore | None):
        """Record into ``store`` inside the block (e.g. the frozen and trained passes of one UNet).
        With gradient checkpointing, what is recorded is decided in the forward; backward re-runs
        record nothing, whichever store is installed then."""
        old = self.store
        self.set_store(store)
        try:
            yield store
        finally:
            self.set_store(old)

    def remove(self) -> None:
        """Restore the processors that were there before, and drop the hooks. Idempotent."""
        if not self.active:
            return
        for h in self._hooks:
            h.remove()
        self.unet.set_attn_processor(dict(self._saved))  # set_attn_processor pops from the dict it gets
        self.active = False


def install_capture(
    unet,
    store: AttentionStore | None,
    layers: LayerFilter = None,
    others: str = "sdpa",
    explicit: bool | None = None,
):
    """Install :class:`CaptureCrossAttnProcessor` on the UNet's cross-attention layers.

    Args:
        unet: a diffusers model with ``attn_processors`` / ``set_attn_processor`` (UNet2DConditionModel).
        store: where to record (changeable later with :meth:`CaptureHandle.set_store`).
        layers: which ``attn2`` layers capture: None (all), a predicate on the layer name, a substring,
            or layer / processor names. Non-``attn2`` names never capture.
        others: ``"sdpa"`` puts ``AttnProcessor2_0`` on every other layer; ``"keep"`` leaves them.
        explicit: compute the captured layers' attention with explicit probabilities (needed to
            record ``probs``); default: whether ``store`` records them. Fixed for the installation,
            so a store switched in later that records probs needs ``explicit=True`` here.

    Returns a :class:`CaptureHandle`; ``handle.remove()`` restores the previous processors.
    """
    if others not in ("sdpa", "keep"):
        raise ValueError(f"others must be 'sdpa' or 'keep', not {others!r}")
    saved = dict(unet.attn_processors)
    match = _matcher(layers)
    new: dict = {}
    captures: dict[str, CaptureCrossAttnProcessor] = {}
    for key, proc in saved.items():
        name = _layer_name(key)
        if is_cross_attention_layer(name) and match(name):
            captures[name] = new[key] = CaptureCrossAttnProcessor(store, name, explicit=explicit)
        else:
            new[key] = AttnProcessor2_0() if others == "sdpa" else proc
    if layers is not None and not captures:
        raise ValueError("no cross-attention layer matches `layers`")
    unet.set_attn_processor(new)

    hooks = []
    handle = CaptureHandle(unet, saved, captures, hooks)
    try:

        def begin(module, args, kwargs):
            sample = kwargs.get("sample", args[0] if args else None)
            st = handle.store
            if st is not None and st.enabled:
                st.begin_forward(tuple(sample.shape[-2:]) if torch.is_tensor(sample) and sample.ndim == 4 else None)

        hooks.append(unet.register_forward_pre_hook(begin, with_kwargs=True))

        # The exact (h, w) of each layer: its Transformer2DModel receives (B, C, h, w).
        modules = dict(unet.named_modules())
        by_parent: dict[str, list[CaptureCrossAttnProcessor]] = {}
        for name, proc in captures.items():
            m = _TRANSFORMER_PARENT.match(name)
            if m and m.group(1) in modules:
                by_parent.setdefault(m.group(1), []).append(proc)
        for parent, procs in by_parent.items():

            def set_hw(module, args, kwargs, procs=procs):
                x = kwargs.get("hidden_states", args[0] if args else None)
                hw = tuple(x.shape[-2:]) if torch.is_tensor(x) and x.ndim == 4 else None
                for p in procs:
                    p.hw = hw

            hooks.append(modules[parent].register_forward_pre_hook(set_hw, with_kwargs=True))
    except BaseException:
        handle.remove()
        raise
    return handle


@contextmanager
def capture_cross_attention(
    unet,
    store: AttentionStore | None,
    layers: LayerFilter = None,
    others: str = "sdpa",
    explicit: bool | None = None,
):
    """Context manager around :func:`install_capture`: yields the store, restores the previous
    processors on exit (also when an exception escapes)."""
    handle = install_capture(unet, store, layers=layers, others=others, explicit=explicit)
    try:
        yield store
    finally:
        handle.remove()
