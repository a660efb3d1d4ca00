from open_clip.tokenizer import SimpleTokenizer

from spfbench.captions import compose, load_vocab
from spfbench.clip_tokenizer import clip_tokenizer


def test_offline_tokenizer_equals_openai_clip_tokenization():
    # open_clip's SimpleTokenizer is an independent implementation of OpenAI CLIP's BPE.
    tok, ref = clip_tokenizer(), SimpleTokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    vocab = load_vocab()
    texts = [r.base_caption for r in compose(200, seed=1)]
    texts += [t for spec in vocab["targets"].values() for t in spec["texts"]]
    texts += ["Café au lait, naïve élan", "it's 3.5 o'clock!!", "   spaced    out   "]
    for text in texts:
        assert tok(text).input_ids == [ref.sot_token_id, *ref.encode(text), ref.eot_token_id], text


def test_padding_to_77():
    ids = clip_tokenizer()(["a hat"], padding="max_length", max_length=77).input_ids[0]
    assert len(ids) == 77 and ids[:4] == [49406, 320, 3801, 49407] and set(ids[4:]) == {49407}
