"""Cross-attention capture (trainers/attention.py) on the tiny preset's UNet (CPU, random weights)."""

import pytest
import torch

from trainers.attention import (
    AttentionStore,
    CaptureCrossAttnProcessor,
    attention_features,
    capture_cross_attention,
    install_capture,
    resize_maps,
    spatial_size,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, shared cores

ATOL = 1e-5
T = 7  # text tokens


def _tiny_unet():
    # The tiny preset's UNet alone (load_pipeline("tiny") builds the same UNet plus VAE / CLIP,
    # several seconds more on CPU).
    from diffusers import UNet2DConditionModel

    from spfbench.models import CONFIG_DIR

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR / "tiny" / "unet"))
    return unet.eval()


@pytest.fixture(scope="module")
def unet():
    return _tiny_unet()


def _inputs(unet, b=2, h=16, w=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g)
    emb = torch.randn(b, T, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500][:b])
    return x, t, emb


def _attn2(unet):
    return {n: m for n, m in unet.named_modules() if n.endswith("attn2")}


def _processor_ids(unet):
    return {k: id(v) for k, v in unet.attn_processors.items()}


def test_each_layer_equals_sdpa_processor(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    g = torch.Generator().manual_seed(2)
    sdpa = AttnProcessor2_0()
    layers = _attn2(unet)
    assert len(layers) == 7
    bias = torch.zeros(2, 1, T)
    bias[:, :, -2:] = -10000.0  # the UNet's encoder_attention_mask form: additive (B, 1, S)
    keep = torch.ones(2, 1, T, dtype=torch.bool)
    keep[0, :, -3:] = False
    for name, attn in layers.items():
        c = attn.to_q.in_features
        hs = torch.randn(2, 20, c, generator=g)
        enc = torch.randn(2, T, attn.to_k.in_features, generator=g)
        for mask in (None, bias, keep):
            ref = sdpa(attn, hs, enc, attention_mask=mask)
            for flags in ({"probs": True}, {"query": True, "key": True, "probs": False}):
                store = AttentionStore(**flags)
                out = CaptureCrossAttnProcessor(store, name)(attn, hs, enc, attention_mask=mask)
                torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
                assert list(store.records) == [name]
            if mask is not None:  # masked tokens get no probability
                store_probs = AttentionStore(probs=True)
                CaptureCrossAttnProcessor(store_probs, name)(attn, hs, enc, attention_mask=mask)
                m = store_probs[name].probs
                dropped = (mask.float() < 0) if mask.dtype != torch.bool else ~mask
                assert m.masked_select(dropped.unsqueeze(1).expand_as(m)).abs().max() < 1e-4
        # self-attention call (on the block's attn1): plain SDPA, nothing recorded
        attn1 = unet.get_submodule(name[: -len("attn2")] + "attn1")
        store = AttentionStore(query=True, key=True)
        hs_self = torch.randn(2, 20, c, generator=g)
        torch.testing.assert_close(
            CaptureCrossAttnProcessor(store, name)(attn1, hs_self), sdpa(attn1, hs_self), atol=0, rtol=0
        )
        assert len(store) == 0
        # 4-D input: (h, w) read off the shape
        hs4 = torch.randn(2, c, 4, 5, generator=g)
        store = AttentionStore()
        out = CaptureCrossAttnProcessor(store, name)(attn, hs4, enc)
        torch.testing.assert_close(out, sdpa(attn, hs4, enc), atol=ATOL, rtol=0)
        assert store[name].hw == (4, 5)


def test_unet_forward_equals_sdpa_and_only_cross_attention_captured(unet):
    x, t, emb = _inputs(unet)
    mask = torch.ones(2, T)
    mask[1, -3:] = 0
    before = _processor_ids(unet)
    with torch.no_grad():
        for kw in ({}, {"encoder_attention_mask": mask}):
            ref = unet(x, t, emb, **kw).sample
            store = AttentionStore(query=True, key=True, probs=True)
            with capture_cross_attention(unet, store) as s:
                assert s is store
                procs = unet.attn_processors
                out = unet(x, t, emb, **kw).sample
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
            assert sorted(store.names()) == sorted(_attn2(unet))
            assert all(len(v) == 1 for v in store.records.values())
            assert sum(isinstance(p, CaptureCrossAttnProcessor) for p in procs.values()) == 7
            assert all(isinstance(p, CaptureCrossAttnProcessor) == k.endswith("attn2.processor") for k, p in procs.items())
    assert _processor_ids(unet) == before


def test_probs_are_softmax_of_stored_q_k(unet):
    x, t, emb = _inputs(unet)
    store = AttentionStore(query=True, key=True, probs=True)
    with torch.no_grad(), capture_cross_attention(unet, store):
        unet(x, t, emb)
    sizes = {}
    for name in store.names():
        r = store[name]
        b, h, n, d = r.query.shape
        assert (b, h) == (2, r.heads) == (2, 2) and r.key.shape == (b, h, T, d)
        assert r.probs.shape == (b, h, n, T)
        assert r.scale == pytest.approx(d**-0.5)
        torch.testing.assert_close(r.probs.sum(-1), torch.ones(b, h, n), atol=1e-6, rtol=0)
        want = torch.softmax(torch.einsum("bhnd,bhtd->bhnt", r.query, r.key) / d**0.5, dim=-1)
        torch.testing.assert_close(r.probs, want, atol=1e-6, rtol=0)
        sizes[name] = r.hw
        assert r.hw[0] * r.hw[1] == n
    assert sizes["down_blocks.0.attentions.0.transformer_blocks.0.attn2"] == (16, 16)
    assert sizes["mid_block.attentions.0.transformer_blocks.0.attn2"] == (4, 4)
    maps = store.maps()
    assert all(m.shape[-1] == T and m.dim() == 3 for m in maps.values())
    groups = store.group_by_resolution(lambda n: not n.startswith("down_blocks"))
    assert {hw: len(v) for hw, v in groups.items()} == {(4, 4): 1, (8, 8): 2, (16, 16): 2}
    gm = store.grouped_maps(lambda n: not n.startswith("down_blocks"))
    up16 = groups[(16, 16)]
    torch.testing.assert_close(gm[(16, 16)], (maps[up16[0]] + maps[up16[1]]) / 2)
    mean64 = store.mean_map(64)
    assert mean64.shape == (2, 64 * 64, T)
    torch.testing.assert_close(mean64.sum(-1), torch.ones(2, 64 * 64), atol=1e-5, rtol=0)
    assert store.mean_map(8, layout="grid").shape == (2, T, 8, 8)
    assert store.maps(reduce_heads=None)[up16[0]].shape == (2, 2, 256, T)


def test_attention_features_formula():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 12, 4, generator=g)
    k = torch.randn(2, 2, 5, 4, generator=g)
    want = torch.softmax(k @ q.transpose(-1, -2) / 2.0, dim=-1) @ q  # sqrt(d) = 2
    torch.testing.assert_close(attention_features(q, k), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(attention_features(q, k, tokens=slice(0, 3)), want[:, :, :3], atol=1e-6, rtol=0)


def _attn2_qk_grads(unet):
    return {n: (m.to_q.weight.grad, m.to_k.weight.grad) for n, m in _attn2(unet).items()}


def test_gradients_flow_to_attn2_weights_unless_detached():
    unet = _tiny_unet()
    x, t, emb = _inputs(unet)
    store = AttentionStore(query=True, probs=True)
    with capture_cross_attention(unet, store):
        unet(x, t, emb)
    loss = sum((p**2).sum() for p in store.maps().values()) + sum(q.pow(2).mean() for q in store.queries().values())
    loss.backward()
    for name, (gq, gk) in _attn2_qk_grads(unet).items():
        assert gq is not None and gq.abs().sum() > 0, name
        assert gk is not None and gk.abs().sum() > 0, name
    unet.zero_grad(set_to_none=True)

    detached = AttentionStore(query=True, key=True, probs=True, keep_grad=False)
    with capture_cross_attention(unet, detached):
        out = unet(x, t, emb).sample
    assert out.requires_grad
    r = next(iter(detached.records.values()))[-1]
    assert not (r.query.requires_grad or r.key.requires_grad or r.probs.requires_grad)

    frozen = AttentionStore(query=True, probs=True)  # reference path: no_grad, no graph kept
    with torch.no_grad(), capture_cross_attention(unet, frozen):
        unet(x, t, emb)
    assert all(r.probs.grad_fn is None and r.query.grad_fn is None for rs in frozen.records.values() for r in rs)

    half = AttentionStore(query=True, probs=True, dtype=torch.float16)
    with torch.no_grad(), capture_cross_attention(unet, half):
        unet(x, t, emb)
    assert all(r.probs.dtype == torch.float16 and r.query.dtype == torch.float16 for rs in half.records.values() for r in rs)
    assert all(r.key is None for rs in half.records.values() for r in rs)  # only what is asked
    with pytest.raises(ValueError):
        half.keys()


def test_gradient_checkpointing_same_grads_no_duplicate_records():
    x_t_emb = None
    grads = []
    for ckpt in (False, True):
        unet = _tiny_unet().train()
        if ckpt:
            unet.enable_gradient_checkpointing()
        x_t_emb = x_t_emb or _inputs(unet)
        store = AttentionStore(query=True, probs=True)
        with capture_cross_attention(unet, store):
            out = unet(*x_t_emb).sample
            loss = out.square().mean() + sum(p.square().sum() for p in store.maps().values())
            loss.backward()
        assert all(len(v) == 1 for v in store.records.values())
        grads.append({n: g for n, (g, _) in _attn2_qk_grads(unet).items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_processors_and_hooks_restored_also_after_exception(unet):
    from diffusers.models.attention_processor import AttnProcessor

    # a non-default processor on one self-attention layer must come back too
    key = "mid_block.attentions.0.transformer_blocks.0.attn1.processor"
    procs = dict(unet.attn_processors)
    procs[key] = AttnProcessor()
    unet.set_attn_processor(dict(procs))
    before = _processor_ids(unet)
    hooks_before = len(unet._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_cross_attention(unet, AttentionStore()):
            assert type(unet.attn_processors[key]).__name__ == "AttnProcessor2_0"  # others -> SDPA
            raise RuntimeError("boom")
    assert _processor_ids(unet) == before
    assert len(unet._forward_pre_hooks) == hooks_before
    assert not any(len(m._forward_pre_hooks) for m in unet.modules())
    with capture_cross_attention(unet, AttentionStore(), others="keep"):
        assert isinstance(unet.attn_processors[key], AttnProcessor)
    assert _processor_ids(unet) == before
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


def test_layer_selection_store_switching_and_reset(unet):
    x, t, emb = _inputs(unet)
    store = AttentionStore()
    with torch.no_grad(), capture_cross_attention(unet, store, layers=lambda n: n.startswith("up_blocks")):
        unet(x, t, emb)
        assert len(store) == 4 and all(n.startswith("up_blocks") for n in store.names())
        unet(x, t, emb)  # auto_reset: one call per layer, not two
        assert all(len(v) == 1 for v in store.records.values())
    acc = AttentionStore(auto_reset=False)
    with torch.no_grad(), capture_cross_attention(unet, acc, layers="mid_block"):
        unet(x, t, emb)
        unet(x, t, emb)
    assert acc.names() == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert len(acc.records[acc.names()[0]]) == 2
    with pytest.raises(ValueError):
        install_capture(unet, acc, layers="no-such-layer")

    a, b = AttentionStore(query=True, probs=False), AttentionStore(query=True, probs=False)
    handle = install_capture(unet, a)
    try:
        with torch.no_grad():
            unet(x, t, emb)
            with handle.using(b):
                unet(x, t, emb[:, :3])
            unet(x, t, emb)
            with handle.using(None):  # capture nothing
                unet(x, t, emb)
    finally:
        handle.remove()
    assert len(a) == 7 and len(b) == 7
    assert all(v[-1].key is None and v[-1].query.shape[2] > 0 for v in a.records.values())
    assert {v[-1].query.shape[0] for v in b.records.values()} == {2}
    assert all(v[-1].probs is None for v in a.records.values())
    with pytest.raises(ValueError):
        a.maps()


def test_non_square_latents_spatial_size(unet):
    for h, w, want in [(16, 24, {(16, 24), (8, 12), (4, 6)}), (18, 14, {(18, 14), (9, 7), (5, 4)})]:
        x, t, emb = _inputs(unet, h=h, w=w)
        store = AttentionStore()
        with torch.no_grad(), capture_cross_attention(unet, store):
            out = unet(x, t, emb).sample
        assert out.shape[-2:] == (h, w)
        hws = {store[n].hw for n in store.names()}
        assert hws == want
        # the fallback derivation (processor used without install_capture) agrees with the hooks
        for n in store.names():
            hw = store[n].hw
            assert spatial_size(hw[0] * hw[1], (h, w)) == hw
        assert store.mean_map((h, w), layout="grid").shape == (2, T, h, w)
    assert spatial_size(64) == (8, 8) and spatial_size(12) is None


def test_lora_unet(unet):
    import peft

    lora = _tiny_unet()
    lora.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x, t, emb = _inputs(lora)
    with torch.no_grad():
        ref = lora(x, t, emb).sample
        s_lora = AttentionStore(query=True, key=True, probs=True)
        with capture_cross_attention(lora, s_lora):
            out = lora(x, t, emb).sample
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        base_out = unet(x, t, emb).sample
        assert (out - base_out).abs().max() > 1e-3
        # queries at the first cross-attention layer see the same input in both models, so the
        # difference is the LoRA contribution of to_q alone
        s_base = AttentionStore(query=True, key=True)
        with capture_cross_attention(unet, s_base):
            unet(x, t, emb)
    first = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert len(s_lora) == 7
    assert (s_lora[first].query - s_base[first].query).abs().max() > 1e-3
    assert (s_lora[first].key - s_base[first].key).abs().max() > 1e-3

    # with the adapters disabled the LoRA'd UNet captures the base queries
    lora.disable_adapters()
    s_off = AttentionStore(query=True)
    with torch.no_grad(), capture_cross_attention(lora, s_off):
        lora(x, t, emb)
    torch.testing.assert_close(s_off[first].query, s_base[first].query, atol=ATOL, rtol=0)
    lora.enable_adapters()

    # gradients reach the LoRA weights of attn2's to_q through the stored maps
    lora.train()
    s = AttentionStore(probs=True)
    with capture_cross_attention(lora, s):
        lora(x, t, emb)
    sum(p.square().sum() for p in s.maps().values()).backward()
    attn2 = _attn2(lora)[first]
    assert attn2.to_q.lora_A["default"].weight.grad.abs().sum() > 0


def test_resize_maps_hand_made():
    # (B=1, N=2x2, T=2): token 0 is a ramp in x, token 1 constant
    m = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]])
    flat = resize_maps(m, 4)
    assert flat.shape == (1, 16, 2)
    grid = resize_maps(m, 4, layout="grid")
    assert grid.shape == (1, 2, 4, 4)
    # bilinear, align_corners=False: output x centres map to input x = -0.25, 0.25, 0.75, 1.25 (clamped)
    row = torch.tensor([0.0, 0.25, 0.75, 1.0])
    torch.testing.assert_close(grid[0, 0], row.expand(4, 4))
    torch.testing.assert_close(grid[0, 1], torch.ones(4, 4))
    torch.testing.assert_close(flat[0, :, 0], row.repeat(4))
    torch.testing.assert_close(resize_maps(m, 2), m)  # same size: unchanged
    # non-square source, extra leading (heads) dim, rectangular target
    r = torch.arange(6.0).reshape(1, 1, 6, 1)  # 2x3 grid, row-major
    out = resize_maps(r, (2, 3), hw=(2, 3), layout="grid")
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([[0.0, 1, 2], [3, 4, 5]]))
    with pytest.raises(ValueError):
        resize_maps(torch.zeros(1, 6, 1), 4)


def test_pipeline_maps_over_timesteps(tiny_pipe):
    """The viz use: the tiny preset's pipeline with CFG, one map set per denoising step."""
    before = _processor_ids(tiny_pipe.unet)
    store = AttentionStore(probs=True, keep_grad=False)
    per_step = []

    def on_step(pipe, i, t, kwargs):
        per_step.append(store.mean_map(16))  # (2B, 256, 77): unconditional and conditional halves
        return kwargs

    with capture_cross_attention(tiny_pipe.unet, store):
        tiny_pipe(
            "a woman wearing a hat",
            num_inference_steps=3,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=on_step,
        )
    assert _processor_ids(tiny_pipe.unet) == before
    assert len(per_step) == len(tiny_pipe.scheduler.timesteps)  # one UNet call per step (PNDM: 4)
    assert all(m.shape == (2, 256, 77) for m in per_step)
    assert not torch.allclose(per_step[0], per_step[-1])  # maps change with the timestep
