import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from spfbench.errors import MissingWeightsError, SpfbenchError
from spfbench.metrics import Backbones, Batch, create
from spfbench.metrics.clip import tiny_clip
from spfbench.metrics.hpsv2 import HPS_ARCH, apply_hps_state, load_hps_state

KEYS = Path(__file__).parent / "data" / "hpsv2_vit_h_14_keys.json"
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _images(n, seed, size=(48, 30)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _stock_vit_h_14_on_meta():
    import open_clip
    from open_clip.factory import get_model_config

    with torch.device("meta"):
        return open_clip.CLIP(**get_model_config(HPS_ARCH))


def test_published_key_layout_loads_strictly_into_stock_vit_h_14():
    published = json.loads(KEYS.read_text())["keys"]
    assert len(published) == 686
    model = _stock_vit_h_14_on_meta()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == published
    # a checkpoint in the published layout, as the HPS training script saves it (DDP 'module.' prefix tolerated)
    state = {f"module.{k}": torch.empty(shape, device="meta") for k, shape in published.items()}
    apply_hps_state(model, {"state_dict": state})
    missing = dict(list(state.items())[:-1])  # one key short -> a clear error
    with pytest.raises(SpfbenchError, match="1 missing keys"):
        apply_hps_state(model, {"state_dict": missing})


def test_checkpoint_file_round_trip_and_refusals(tmp_path):
    src, _, _ = tiny_clip(seed=5, quick_gelu=False)
    dst, _, _ = tiny_clip(seed=6, quick_gelu=False)
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    load_hps_state(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k

    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SpfbenchError, match="cannot read HPS checkpoint"):
        load_hps_state(dst, tmp_path / "bad.pt")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "code.pt")  # a pickled module: never unpickled
    with pytest.raises(SpfbenchError, match="cannot read HPS checkpoint"):
        load_hps_state(dst, tmp_path / "code.pt")


def test_hpsv2_is_the_cosine_of_image_and_prompt_with_longest_side_padding():
    batch = Batch(["a", "b"], _images(2, 0), _images(2, 1), ["a hat", "freckles"],
                  prompts=["A woman, reading, in a park, in a red coat, a hat", "A man, smiling, freckles"])
    m = create("hpsv2@v2.1", Backbones("tiny", "cpu"))
    m.update(batch)

    model, _, tokenizer = tiny_clip(seed=1, quick_gelu=False)
    model.eval()

    def prep(im):  # resize the longest side to 32 (bicubic), pad to 32 x 32 centred with black, OpenAI mean/std
        w, h = im.size
        nw, nh = 32, round(h * 32 / w)
        x = TF.to_tensor(TF.resize(im, [nh, nw], interpolation=TF.InterpolationMode.BICUBIC))
        top = (32 - nh) // 2
        x = torch.nn.functional.pad(x, (0, 0, top, 32 - nh - top))
        return TF.normalize(x, MEAN, STD)

    with torch.no_grad():
        img = model.encode_image(torch.stack([prep(im) for im in batch.customized]))
        txt = model.encode_text(tokenizer(batch.prompts))
    expected = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    got = torch.tensor([m.values[i] for i in batch.ids])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert m.compute()["n"] == 2 and m.compute()["higher_is_better"]


def test_hpsv2_needs_prompts_and_real_weights(tmp_path, monkeypatch):
    batch = Batch(["a"], _images(1, 0), _images(1, 1), ["a hat"])
    with pytest.raises(SpfbenchError, match="no prompts"):
        create("hpsv2@v2.1", Backbones("tiny", "cpu")).update(batch)
    batch.prompts = ["A woman, a hat"]
    with pytest.raises(MissingWeightsError, match=r"HPS_v2.1_compressed.pt .*hf://xswu/HPSv2.*--weights hpsv2=") as e:
        create("hpsv2@v2.1", Backbones("real", "cpu")).update(batch)
    assert "\n" not in str(e.value)
    with pytest.raises(MissingWeightsError):
        create("hpsv2@v2.1", Backbones("real", "cpu", weights={"hpsv2": str(tmp_path / "nowhere.pt")})).update(batch)
