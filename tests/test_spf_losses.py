"""SPF-Portrait losses and SFCM (trainers/spf_losses.py) against independent computations.

The references below are written differently from the implementation on purpose: explicit Python loops
over batch, head, token and position, exp/sum instead of softmax, numpy instead of torch where handy.
"""

import math

import numpy as np
import pytest
import torch

from spfbench.captions import join_caption, split_base_phrases
from trainers import spf_losses as S

PAPER_BASE = "A woman, playing a guitar, with a red background, in a white T-shirt"
PAPER_TARGET = "a hat"


def _layers(seed, b=2, h=2, d=4, t=5, sides=(4, 2), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = [torch.randn(b, h, s * s, d, generator=g, dtype=dtype) for s in sides]
    k = [torch.randn(b, h, t, d, generator=g, dtype=dtype) for s in sides]
    return q, k


def _weight_ref(m_hat, side):
    """(1 - M-hat) averaged over the S/side x S/side block of each feature position, row-major."""
    b, s, _ = m_hat.shape
    f = s // side
    out = torch.zeros(b, side * side, dtype=torch.float64)
    for bi in range(b):
        for y in range(side):
            for x in range(side):
                block = m_hat[bi, y * f : (y + 1) * f, x * f : (x + 1) * f].double()
                out[bi, y * side + x] = 1.0 - block.mean()
    return out


def _features_ref(q, k, w=None, mode="pool"):
    """F[b, h, t, :] = sum_n p[t, n] w[n] q[n] with p the softmax over image positions, by loops."""
    b, h, n, d = q.shape
    t = k.shape[2]
    out = torch.zeros(b, h, t, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                logits = [float((k[bi, hi, ti] * q[bi, hi, ni]).sum()) / math.sqrt(d) for ni in range(n)]
                m = max(logits)
                e = [math.exp(v - m) for v in logits]
                z = sum(e)
                p = [v / z for v in e]
                ws = [1.0] * n if w is None else [float(w[bi, ni]) for ni in range(n)]
                if mode == "renorm":
                    zz = sum(pi * wi for pi, wi in zip(p, ws))
                    coef = [pi * wi / zz if zz > 0 else 0.0 for pi, wi in zip(p, ws)]
                else:
                    coef = [pi * wi for pi, wi in zip(p, ws)]
                for ni in range(n):
                    out[bi, hi, ti] += coef[ni] * q[bi, hi, ni].double()
    return out


# ------------------------------------------------------------------------------ eq. 3


def test_attention_features_matches_loops():
    q, k = _layers(0, sides=(3,))
    w = torch.rand(2, 9, dtype=torch.float64)
    torch.testing.assert_close(S.attention_features(q[0], k[0]), _features_ref(q[0], k[0]))
    for mode in ("pool", "renorm"):
        torch.testing.assert_close(S.attention_features(q[0], k[0], w, mode), _features_ref(q[0], k[0], w, mode))


@pytest.mark.parametrize("norm,layer_reduction", [("mse", "mean"), ("l2", "sum"), ("mse", "sum"), ("l2", "mean")])
def test_text_consistent_matches_reference(norm, layer_reduction):
    q_ref, k_ref = _layers(1)
    q_res, k_res = _layers(2, t=7)  # response path has more tokens: [E_base, E_tar]
    sel = torch.tensor([0, 1, 2, 3, 4])  # base tokens at the same positions as in the reference path
    m_hat = torch.rand(2, 64, 64, dtype=torch.float64)
    got = S.text_consistent_loss(
        q_ref, k_ref, q_res, k_res, res_token_idx=sel, m_hat=m_hat, norm=norm, layer_reduction=layer_reduction
    )
    vals = []
    for qr, kr, qs, ks in zip(q_ref, k_ref, q_res, k_res):
        side = int(math.isqrt(qr.shape[2]))
        w = _weight_ref(m_hat, side)
        diff = _features_ref(qr, kr, w) - _features_ref(qs, ks[:, :, :5], w)
        if norm == "mse":
            vals.append(float((diff**2).sum()) / diff.numel())
        else:
            vals.append(np.mean([math.sqrt(float((diff[b] ** 2).sum())) for b in range(diff.shape[0])]))
    want = sum(vals) / (len(vals) if layer_reduction == "mean" else 1)
    assert float(got) == pytest.approx(want, rel=1e-10)


def test_text_consistent_token_mask_and_per_sample_index():
    q_ref, k_ref = _layers(3)
    q_res, k_res = _layers(4, t=7)
    idx = torch.tensor([[1, 2, 3], [2, 4, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    got = S.text_consistent_loss(
        q_ref, k_ref, q_res, k_res, ref_token_idx=idx, res_token_idx=idx, token_mask=mask
    )
    vals = []
    for qr, kr, qs, ks in zip(q_ref, k_ref, q_res, k_res):
        sq, cnt = 0.0, 0
        for b in range(2):
            toks = [int(i) for i, m in zip(idx[b], mask[b]) if m]
            fr = _features_ref(qr[b : b + 1], kr[b : b + 1, :, toks])
            fs = _features_ref(qs[b : b + 1], ks[b : b + 1, :, toks])
            sq += float(((fr - fs) ** 2).sum())
            cnt += fr.numel()
        vals.append(sq / cnt)
    assert float(got) == pytest.approx(np.mean(vals), rel=1e-10)


def test_identical_paths_give_zero_alignment_losses():
    q, k = _layers(5)
    k_res = [torch.cat([kk, torch.randn(2, 2, 3, 4, dtype=kk.dtype)], 2) for kk in k]  # + target tokens
    sel = torch.arange(5)
    for m_hat in (None, torch.rand(2, 64, 64)):
        for norm in ("mse", "l2"):
            assert float(S.text_consistent_loss(q, k, q, k_res, res_token_idx=sel, m_hat=m_hat, norm=norm)) == 0
            assert float(S.fine_grained_loss(q, q, m_hat=m_hat, norm=norm)) == 0


def test_masks_of_zeros_and_ones():
    q_ref, k_ref = _layers(6)
    q_res, k_res = _layers(7)
    zeros, ones = torch.zeros(2, 64, 64), torch.ones(2, 64, 64)
    for mode in ("pool", "renorm"):
        # M-hat = 0 everywhere: (1 - M-hat) = 1, eq. 8 reduces to the vanilla eq. 3 / eq. 4
        assert float(S.text_consistent_loss(q_ref, k_ref, q_res, k_res, m_hat=zeros, mask_mode=mode)) == pytest.approx(
            float(S.text_consistent_loss(q_ref, k_ref, q_res, k_res)), rel=1e-12
        )
        # M-hat = 1 everywhere: nothing is aligned
        assert float(S.text_consistent_loss(q_ref, k_ref, q_res, k_res, m_hat=ones, mask_mode=mode)) == 0
    assert float(S.fine_grained_loss(q_ref, q_res, m_hat=zeros)) == pytest.approx(
        float(S.fine_grained_loss(q_ref, q_res)), rel=1e-12
    )
    assert float(S.fine_grained_loss(q_ref, q_res, m_hat=ones)) == 0


def test_mask_only_where_target_region():
    """A map that is 1 on the left half: the fine loss ignores differences there, counts them elsewhere."""
    q_ref, _ = _layers(8, sides=(4,))
    m_hat = torch.zeros(1, 64, 64)
    m_hat[:, :, :32] = 1
    q_res = [q_ref[0][:1].clone()]
    q_res[0][:, :, [0, 1, 4, 5, 8, 9, 12, 13]] += 1.0  # left half of the 4x4 map (columns 0, 1)
    assert float(S.fine_grained_loss([q_ref[0][:1]], q_res, m_hat=m_hat)) == 0
    q_res[0][:, :, 2] += 1.0  # column 2: right half
    assert float(S.fine_grained_loss([q_ref[0][:1]], q_res, m_hat=m_hat)) > 0


def test_fine_grained_matches_einsum():
    q_ref, _ = _layers(9)
    q_res, _ = _layers(10)
    m_hat = torch.rand(2, 64, 64, dtype=torch.float64)
    vals = []
    for qr, qs in zip(q_ref, q_res):
        w = _weight_ref(m_hat, int(math.isqrt(qr.shape[2])))
        d = qr - qs
        vals.append(float(torch.einsum("bhnd,bhnd,bn,bn->", d, d, w, w)) / d.numel())
    got = S.fine_grained_loss(q_ref, q_res, m_hat=m_hat)
    assert float(got) == pytest.approx(np.mean(vals), rel=1e-10)


def test_gradients_reach_response_path_only():
    q_ref, k_ref = _layers(11, dtype=torch.float32)
    q_res, k_res = _layers(12, dtype=torch.float32)
    for t in q_ref + k_ref + q_res + k_res:
        t.requires_grad_(True)
    m_hat = torch.rand(2, 64, 64, requires_grad=True)
    loss = S.text_consistent_loss(q_ref, k_ref, q_res, k_res, m_hat=m_hat) + S.fine_grained_loss(
        q_ref, q_res, m_hat=m_hat
    )
    loss.backward()
    assert all(t.grad is None for t in q_ref + k_ref) and m_hat.grad is None
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in q_res + k_res)


def test_non_square_layers_need_latent_hw():
    q = [torch.randn(1, 1, 8 * 6, 4)]
    with pytest.raises(ValueError):
        S.fine_grained_loss(q, q, m_hat=torch.zeros(1, 64, 64))
    assert float(S.fine_grained_loss(q, q, m_hat=torch.zeros(1, 64, 64), latent_hw=(16, 12))) == 0


# ------------------------------------------------------------------------------ eq. 5-7


def _minmax_np(a):
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def test_noise_difference_map_reference():
    g = torch.Generator().manual_seed(13)
    e1, e2 = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 4, 64, 64, generator=g)
    got = S.noise_difference_map(e1, e2)
    for b in range(2):
        want = _minmax_np(np.abs(e1[b].numpy() - e2[b].numpy()).mean(0))
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-5, atol=1e-6)
    # a smaller latent is upsampled to 64 x 64; a v-prediction style rescaling changes nothing
    small = S.noise_difference_map(e1[:, :, :8, :8], e2[:, :, :8, :8])
    assert small.shape == (2, 64, 64) and float(small.min()) >= 0 and float(small.max()) == pytest.approx(1)
    torch.testing.assert_close(S.noise_difference_map(3 * e1, 3 * e2), got)


def test_sfcm_with_all_gamma_one_is_the_normalised_noise_difference():
    g = torch.Generator().manual_seed(14)
    e1, e2 = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 4, 64, 64, generator=g)
    maps = torch.rand(2, 3, 64, 64, generator=g)
    m_hat = S.sfcm(e1, e2, maps, torch.ones(2, 3))
    for b in range(2):
        want = _minmax_np(np.abs((e1[b] - e2[b]).numpy()).mean(0))
        np.testing.assert_allclose(m_hat[b].numpy(), want, rtol=1e-5, atol=1e-6)
    # no phrase maps at all: the same
    torch.testing.assert_close(S.sfcm(e1, e2, None, None), m_hat)


def test_sfcm_reference_with_gammas_and_padding():
    g = torch.Generator().manual_seed(15)
    e1, e2 = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    maps = torch.rand(2, 3, 64, 64, generator=g)
    gamma = torch.tensor([[0.9, 0.2, -0.3], [0.5, 1.4, 0.1]])
    pmask = torch.tensor([[True, True, True], [True, True, False]])
    parts = S.sfcm(e1, e2, maps, gamma, phrase_mask=pmask, return_parts=True)
    m = S.noise_difference_map(e1, e2)
    for b in range(2):
        excl = np.zeros((64, 64), dtype=np.float64)
        for i in range(3):
            if pmask[b, i]:
                gi = min(max(float(gamma[b, i]), 0.0), 1.0)
                excl += maps[b, i].double().numpy() * (1 - gi)
        want = np.clip(m[b].double().numpy() - excl, 0, 1)
        np.testing.assert_allclose(parts.m_hat[b].numpy(), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(parts.exclusion[b].numpy(), excl, rtol=1e-5, atol=1e-6)
    assert float(parts.m_hat.min()) >= 0 and float(parts.m_hat.max()) <= 1
    # gamma = 0 and a phrase map of ones: everything excluded
    assert float(S.sfcm(e1, e2, torch.ones(2, 1, 64, 64), torch.zeros(2, 1)).abs().max()) == 0


def test_phrase_attention_maps_reference():
    g = torch.Generator().manual_seed(16)
    t = 6
    probs = [torch.softmax(torch.randn(2, 2, s * s, t, generator=g), -1) for s in (8, 4)]
    positions = [[[1, 2], [4]], [[1], [2, 3, 5]]]
    w, pmask = S.phrase_token_matrix(positions, n_txt=t)
    got = S.phrase_attention_maps(probs, w, size=64)
    assert got.shape == (2, 2, 64, 64) and pmask.all()
    for b in range(2):
        for i, toks in enumerate(positions[b]):
            acc = np.zeros((64, 64))
            for p in probs:
                side = int(math.isqrt(p.shape[2]))
                a = np.zeros((side, side))
                for n in range(side * side):
                    a[n // side, n % side] = np.mean([float(p[b, :, n, tok].mean()) for tok in toks])
                up = torch.nn.functional.interpolate(
                    torch.tensor(a)[None, None], size=(64, 64), mode="bilinear", align_corners=False
                )[0, 0].numpy()
                acc += up / len(probs)
            np.testing.assert_allclose(got[b, i].numpy(), _minmax_np(acc), rtol=1e-4, atol=1e-5)


def test_sfcm_outputs_carry_no_gradient():
    e_ref = torch.randn(1, 4, 8, 8)
    e_res = torch.randn(1, 4, 8, 8, requires_grad=True)
    probs = [torch.softmax(torch.randn(1, 2, 16, 5, requires_grad=True), -1)]
    maps = S.phrase_attention_maps(probs, S.phrase_token_matrix([[[1, 2]]], 5)[0])
    m_hat = S.sfcm(e_ref, e_res, maps, torch.tensor([[0.3]]))
    assert not m_hat.requires_grad and not maps.requires_grad


def test_phrase_gamma_cosines_and_padding():
    vecs = {
        "A woman": [1.0, 0.0, 0.0],
        "playing a guitar": [0.0, 2.0, 0.0],
        "in a park": [1.0, 1.0, 0.0],
        "a hat": [3.0, 4.0, 0.0],
        "freckles": [0.0, 0.0, 1.0],
    }
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return torch.tensor([vecs[t] for t in texts])

    def cos(a, b):
        a, b = np.array(vecs[a]), np.array(vecs[b])
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    one = S.phrase_gamma(encode, ["A woman", "playing a guitar"], "a hat")
    np.testing.assert_allclose(one.numpy(), [cos("A woman", "a hat"), cos("playing a guitar", "a hat")], rtol=1e-6)
    batch = S.phrase_gamma(encode, [["A woman", "playing a guitar", "in a park"], ["A woman"]], ["a hat", "freckles"])
    want = [[cos(p, "a hat") for p in ("A woman", "playing a guitar", "in a park")], [cos("A woman", "freckles"), 1, 1]]
    np.testing.assert_allclose(batch.numpy(), want, rtol=1e-6, atol=1e-7)
    assert len(calls[-1]) == len(set(calls[-1])) == 5  # each distinct text encoded once


def test_phrase_gamma_with_a_tiny_open_clip():
    from spfbench.metrics.clip import tiny_clip

    model, _, tok = tiny_clip()
    encode = lambda texts: model.encode_text(tok(texts))  # noqa: E731
    phrases = split_base_phrases(PAPER_BASE)
    g = S.phrase_gamma(encode, phrases, PAPER_TARGET)
    with torch.no_grad():
        e = torch.nn.functional.normalize(model.encode_text(tok(phrases + [PAPER_TARGET])), dim=-1)
    np.testing.assert_allclose(g.numpy(), (e[:4] @ e[4]).numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ captions


def test_split_base_phrases_on_the_paper_caption():
    want = ["A woman", "playing a guitar", "with a red background", "in a white T-shirt"]
    assert split_base_phrases(PAPER_BASE) == want
    assert split_base_phrases(PAPER_BASE + ".") == split_base_phrases(PAPER_BASE)
    assert split_base_phrases(" a man ,, in a bar ,") == ["a man", "in a bar"]


def test_phrase_token_positions_on_the_paper_caption():
    from spfbench.clip_tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    pos = S.phrase_token_positions(PAPER_BASE, tok)
    assert pos == [[1, 2], [4, 5, 6], [8, 9, 10, 11], [13, 14, 15, 16, 17, 18]]
    complete = tok(join_caption(PAPER_BASE, PAPER_TARGET)).input_ids
    base_ids = tok(PAPER_BASE).input_ids
    assert complete[0] == tok.bos_token_id
    for phrase, p in zip(split_base_phrases(PAPER_BASE), pos):
        want = tok(phrase, add_special_tokens=False).input_ids
        assert [complete[i] for i in p] == want == [base_ids[i] for i in p]
    words = [tok.convert_ids_to_tokens(complete[i]) for i in pos[3]]
    assert words == ["in</w>", "a</w>", "white</w>", "t</w>", "-</w>", "shirt</w>"]
    # the base text's positions: the same tokens in the base and the complete caption
    bpos = S.base_token_positions(PAPER_BASE, tok)
    assert bpos == list(range(1, 19))
    assert [complete[i] for i in bpos] == [base_ids[i] for i in bpos]
    assert base_ids[19] == tok.eos_token_id and tok.convert_ids_to_tokens(complete[19]) == ",</w>"
    assert S.base_token_positions(PAPER_BASE + ".", tok, include_start=True) == [0] + bpos


def test_caption_batches():
    caps = [PAPER_BASE, "A man, in a bar, backlit by the light"]
    idx, mask = S.base_token_batch(caps)
    assert idx.shape == (2, 18) and mask[0].all() and int(mask[1].sum()) == 12
    w, pmask, phrases = S.phrase_token_batch(caps)
    assert w.shape == (2, 4, 77) and pmask.tolist() == [[True] * 4, [True, True, True, False]]
    assert phrases[1] == ["A man", "in a bar", "backlit by the light"]
    torch.testing.assert_close(w.sum(-1), pmask.float())
    assert w[0, 1, 4] == pytest.approx(1 / 3) and w[0, 1, 3] == 0


# ------------------------------------------------------------------------------ eq. 9-10


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_predict_x0_inverts_add_noise(ptype, dtype):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(prediction_type=ptype)
    g = torch.Generator().manual_seed(17)
    x0 = torch.randn(4, 4, 8, 8, generator=g, dtype=dtype)
    eps = torch.randn(4, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.tensor([0, 10, 500, 999])
    xt = sched.add_noise(x0, eps, t)
    out = eps if ptype == "epsilon" else sched.get_velocity(x0, eps, t)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(S.predict_x0(xt, out, t, sched), x0, **tol)
    assert S.predict_x0(xt, x0, t, sched, prediction_type="sample") is not None


def test_predict_x0_defaults_and_gradient():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler()
    assert sched.config.prediction_type == "epsilon"
    xt = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
    eps = torch.randn(2, 4, 4, 4, requires_grad=True)
    x0 = S.predict_x0(xt, eps, torch.tensor([3, 700]), sched)
    assert x0.dtype == torch.float32
    x0.sum().backward()
    a = sched.alphas_cumprod[torch.tensor([3, 700])]
    torch.testing.assert_close(eps.grad[:, 0, 0, 0], -((1 - a) / a).sqrt())


def test_enhanced_loss_zero_when_prediction_is_ground_truth():
    g = torch.Generator().manual_seed(18)
    img, txt = torch.randn(3, 16, generator=g), torch.randn(16, generator=g)
    assert float(S.enhanced_loss(img, img, txt)) == pytest.approx(0, abs=1e-6)
    assert float(S.enhanced_loss(img, img, txt, normalize=False)) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_enhanced_loss_reference_and_gradient(normalize):
    g = torch.Generator().manual_seed(19)
    pred = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    gt = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    loss = S.enhanced_loss(pred, gt, txt, normalize=normalize)
    vals = []
    for b in range(3):
        p, q, t = (x[b].detach().numpy() for x in (pred, gt, txt))
        if normalize:
            p, q, t = p / np.linalg.norm(p), q / np.linalg.norm(q), t / np.linalg.norm(t)
        d1, d2 = p - t, q - t
        vals.append(1 - d1 @ d2 / np.linalg.norm(d1) / np.linalg.norm(d2))
    assert float(loss.detach()) == pytest.approx(np.mean(vals), rel=1e-10)
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert gt.grad is None and txt.grad is None
    np.testing.assert_allclose(S.enhanced_loss(pred, gt, txt, reduction="none", normalize=normalize).detach(), vals)


def test_clip_preprocess_shapes_range_and_gradient():
    x = torch.zeros(2, 3, 40, 60, requires_grad=True)  # mid-grey in [-1, 1]
    y = S.clip_preprocess(x)
    assert y.shape == (2, 3, 224, 224)
    want = [(0.5 - m) / s for m, s in zip(S.OPENAI_CLIP_MEAN, S.OPENAI_CLIP_STD)]
    np.testing.assert_allclose(y.mean((0, 2, 3)).detach().numpy(), want, rtol=1e-5)
    y.sum().backward()
    assert x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ eq. 12


def test_spf_loss_weights_and_switching_off():
    l_diff, l_enh, l_text, l_fine = (torch.tensor(v, requires_grad=True) for v in (0.7, 0.3, 2.0, 5.0))
    total, parts = S.spf_loss(l_diff, l_enh, l_text, l_fine)
    assert float(total.detach()) == pytest.approx(0.7 + 0.6 * 0.3 + 0.2 * 2.0 + 0.1 * 5.0)
    assert set(parts) == {"diff", "enhanced", "text", "fine", "total"}
    assert not any(v.requires_grad for v in parts.values())
    nan = torch.tensor(float("nan"))
    total0, _ = S.spf_loss(l_diff, nan, nan, nan, lambda1=0, lambda2=0, lambda3=0)
    assert total0 is l_diff
    total1, parts1 = S.spf_loss(l_diff, None, l_text, None)
    assert float(total1.detach()) == pytest.approx(0.7 + 0.2 * 2.0) and set(parts1) == {"diff", "text", "total"}
    total.backward()
    assert float(l_fine.grad) == pytest.approx(0.1)
