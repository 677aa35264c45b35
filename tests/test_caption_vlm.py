"""The VLM captioner on a tiny randomly initialised BLIP built from a config, saved to a folder and
loaded by path through the same AutoProcessor / AutoModelForImageTextToText code as a hub checkpoint.
Its captions are gibberish: the tests check batching, shapes and that every image got a string."""
import pyarrow as pa
import pytest
from PIL import Image

from stages import caption as stage
from stages.core import params, shards
from stages.core.images import encode_png
from stages.core.paths import Caption
from stages.models.captioner import Captioner

WORDS = "a the of river boat tree sky sun field bridge picture painting with and in on".split()


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder = tmp_path_factory.mktemp("tiny-blip")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + WORDS) + "\n")
    tok = BertTokenizer(str(vocab), bos_token="[DEC]", model_max_length=64)
    text = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=37, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    out = folder / "model"
    model.save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_git(tmp_path_factory):
    """A decoder-only captioner (GIT): generate() echoes the prompt ids before the new ones."""
    import torch
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    folder = tmp_path_factory.mktemp("tiny-git")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizer(str(vocab), model_max_length=64)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = GitForCausalLM(GitConfig(vision_config=vision, vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=37, max_position_embeddings=64,
                                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                                     pad_token_id=tok.pad_token_id))
    out = folder / "model"
    model.save_pretrained(out)
    GitProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                 tokenizer=tok).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A chat VLM (LLaVA: CLIP vision tower + Llama): the prompt goes through the chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "<image>", "user", "assistant", ":",
                                         "describe", "what", "is", "depicted"] + WORDS)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}assistant : {% endif %}")
    vision = dict(model_type="clip_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=37, image_size=32, patch_size=8, projection_dim=32)
    text = dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, intermediate_size=37, max_position_embeddings=128, bos_token_id=2,
                eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=vocab["<image>"], vision_feature_layer=-1))
    out = tmp_path_factory.mktemp("tiny-llava") / "model"
    model.save_pretrained(out)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                   tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", chat_template=template,
                   num_additional_image_tokens=1).save_pretrained(out)
    return out


def _images(n):
    return [Image.new("RGB", (30 + 7 * i, 20 + 3 * i), (37 * i % 256, 90, 160)) for i in range(n)]


def test_captioner_batches_and_returns_one_string_per_image(tiny_blip):
    cap = Captioner(str(tiny_blip), prompt="a picture of", max_new_tokens=6, batch_size=2)
    assert cap.device == "cpu" and not cap.chat
    seen = []
    generate = cap.model.generate

    def spy(**inputs):
        seen.append(tuple(inputs["pixel_values"].shape))
        out = generate(**inputs)
        assert out.shape[0] == inputs["pixel_values"].shape[0]
        assert out.shape[1] <= inputs["input_ids"].shape[1] + 6  # max_new_tokens respected
        return out

    cap.model.generate = spy
    texts = cap(_images(5))
    assert seen == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
    assert all(not t.lower().startswith("a picture of") for t in texts)  # the prompt is stripped
    assert all(set(t.split()) <= set(WORDS) for t in texts)  # decoded from the tiny vocabulary

    plain = Captioner(str(tiny_blip), prompt="", max_new_tokens=4, batch_size=8)
    assert len(plain(_images(3))) == 3


@pytest.mark.parametrize("kind,prompt,chat", [("tiny_git", "a picture of", False),
                                              ("tiny_llava", "describe what is depicted", True)])
def test_decoder_only_captioner_drops_the_echoed_prompt(request, kind, prompt, chat):
    cap = Captioner(str(request.getfixturevalue(kind)), prompt=prompt, max_new_tokens=4, batch_size=2)
    assert not cap.model.config.is_encoder_decoder and cap.chat == chat
    decoded_lengths = []
    decode = cap.processor.batch_decode

    def spy(ids, **kw):
        decoded_lengths.append(ids.shape[1])
        return decode(ids, **kw)

    cap.processor.batch_decode = spy
    texts = cap(_images(3))
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    assert decoded_lengths and max(decoded_lengths) <= 4  # only the new tokens are decoded


def test_stage_vlm_backend_loads_the_model_by_path(tmp_path, tiny_blip):
    rows = []
    for i, img in enumerate(_images(5)):
        data = encode_png(img)
        rows.append(dict(id=shards.content_id(data), image=data, format="PNG", width=img.width,
                         height=img.height, artist="Sisley" if i % 2 else "Monet", title=f"t{i}"))
    rows.append(dict(id="broken", image=b"\x89PNG not really", format="PNG", title="broken one"))
    shards.write_shards(rows, tmp_path / "raw", shard_rows=10)
    shards.write_table(pa.table({"id": [r["id"] for r in rows], "kept": [True] * 6}), tmp_path / "filter.parquet")
    raw = params.Params().model_dump()
    raw["data"]["holdout"] = 0.34
    raw["caption"].update(backend="vlm", model=str(tiny_blip), prompt="a picture of", max_new_tokens=5,
                          template="{title} by {artist}", batch_size=4, trigger="sks")
    stats = stage.run(params.validate(raw), Caption(shards=tmp_path / "raw", filter=tmp_path / "filter.parquet",
                                                    curated=tmp_path / "curated", reports=tmp_path / "reports"))
    assert stats["images"] == 6 and stats["by_split"] == {"train": 4, "holdout": 2}
    assert stats["by_origin"] == {"vlm": 5, "template (vlm failed: undecodable image)": 1}
    table = pa.concat_tables([shards.read_table(tmp_path / "curated" / s) for s in ("train", "holdout")])
    caps = dict(zip(table["id"].to_pylist(), table["caption"].to_pylist()))
    assert caps["broken"] == "broken one, sks"
    assert all(isinstance(c, str) and c.endswith("sks") for c in caps.values())
