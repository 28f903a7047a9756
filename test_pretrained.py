"""open_clip weights and tokenizer: this project's CLIP must reproduce open_clip's embeddings and token ids.
open_clip_torch is a test-only dependency; nothing is downloaded (random weights, pretrained=None)."""
import os

import open_clip
import pytest
import torch

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from text import (IMAGENET_CLASSNAMES as CLASSNAMES_FILE, clip_tokenizer, read_lines, tokenize, zero_shot_classifier,
                  zero_shot_templates)
from model import CLIP, load_clip_weights, make_config, resize_positional_embedding


def clip_text(batch):
    """Valid CLIP token ids: start, random words, end, zero padding."""
    g = torch.Generator().manual_seed(0)
    text = torch.zeros(batch, 77, dtype=torch.long)
    for i in range(batch):
        n = 3 + 7 * i
        text[i, 0], text[i, n + 1] = 49406, 49407
        text[i, 1:n + 1] = torch.randint(1, 49405, (n,), generator=g)
    return text


@pytest.mark.parametrize("name,quick_gelu", [("ViT-B-32", False), ("ViT-B-32-quickgelu", True)])
def test_open_clip_weights_give_the_same_embeddings(name, quick_gelu):
    torch.manual_seed(0)
    reference = open_clip.create_model(name, pretrained=None).eval()
    ours = CLIP(make_config("ViT-B-32", quick_gelu=quick_gelu)).eval()
    missing, unexpected = load_clip_weights(ours, reference.state_dict())
    assert missing == [] and unexpected == []
    images, text = torch.randn(2, 3, 224, 224), clip_text(3)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images).embedding, reference.encode_image(images), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.encode_text(text), reference.encode_text(text), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["ViT-L-14", "ViT-L-14-336"])
def test_named_configs_match_open_clip(name):
    """The fields open_clip's model config JSON sets (heads and mlp from its defaults: 64 per head, mlp ratio 4)."""
    reference = open_clip.get_model_config(name)
    vision, text, ours = reference["vision_cfg"], reference["text_cfg"], make_config(name)
    assert (ours.embed_dim, ours.image_size, ours.patch_size, ours.width, ours.layers) == (
        reference["embed_dim"], vision["image_size"], vision["patch_size"], vision["width"], vision["layers"])
    assert (ours.heads, ours.mlp_dim) == (vision["width"] // vision.get("head_width", 64), int(vision.get("mlp_ratio", 4.0) * vision["width"]))
    assert (ours.context_length, ours.vocab_size, ours.text_width, ours.text_heads, ours.text_layers) == (
        text["context_length"], text["vocab_size"], text["width"], text["heads"], text["layers"])


def test_open_clip_vit_l_14_336_weights_give_the_same_embeddings():
    """LLaVA-1.5's tower size (~430 M parameters with the text tower): one image, one text, to stay quick."""
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-L-14-336", pretrained=None).eval()
    with torch.device("meta"):  # every weight is loaded below: skip the random initialisation (~15 s on 1 core)
        ours = CLIP(make_config("ViT-L-14-336"))
    ours = ours.to_empty(device="cpu").eval()
    missing, unexpected = load_clip_weights(ours, reference.state_dict())
    assert missing == [] and unexpected == []
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    images, text = torch.randn(1, 3, 336, 336), clip_text(1)
    with torch.no_grad():
        vision = ours.encode_image(images)
        torch.testing.assert_close(vision.embedding, reference.encode_image(images), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.encode_text(text), reference.encode_text(text), atol=1e-4, rtol=1e-4)
    assert vision.tokens.shape == (1, 576, 1024) and vision.valid.all()  # the 24 x 24 tokens LLaVA-1.5 reads


def test_drip_loads_pretrained_blocks_and_starts_only_the_predictor_fresh():
    reference = open_clip.create_model("ViT-B-32", pretrained=None)
    state = {"module." + k: v for k, v in reference.state_dict().items()}  # as saved from DDP
    ours = CLIP(make_config("ViT-B-32", compress=4))
    missing, unexpected = load_clip_weights(ours, {"state_dict": state})
    assert missing and all(k.startswith("visual.boundary_predictor.") for k in missing) and unexpected == []
    torch.testing.assert_close(ours.visual.transformer.resblocks[5].mlp.c_fc.weight,
                               reference.visual.transformer.resblocks[5].mlp.c_fc.weight)


def test_positional_embedding_is_resized_for_another_grid():
    reference = open_clip.create_model("ViT-B-32", pretrained=None)
    ours = CLIP(make_config("ViT-B-32", image_size=288))  # 9 x 9 patches instead of 7 x 7
    load_clip_weights(ours, reference.state_dict())
    pos, old = ours.visual.positional_embedding, reference.visual.positional_embedding
    assert pos.shape == (82, 768)
    torch.testing.assert_close(pos[0], old[0])  # CLS row kept
    # a grid that is constant along rows stays constant along rows after resizing
    ramp = torch.cat([torch.zeros(1, 4), torch.arange(7.).repeat_interleave(7)[:, None].expand(49, 4)])
    resized = resize_positional_embedding(ramp, 81)[1:].reshape(9, 9, 4)
    assert torch.allclose(resized, resized[:, :1]) and (resized[1:, 0] >= resized[:-1, 0] - 1e-5).all()


def test_weights_of_another_size_are_refused():
    reference = open_clip.create_model("ViT-B-32", pretrained=None)
    with pytest.raises(ValueError, match="another model size"):
        load_clip_weights(CLIP(make_config("tiny")), reference.state_dict())


def test_clip_bpe_matches_open_clip_token_ids():
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    ours = clip_tokenizer(path, 77)
    reference = open_clip.get_tokenizer("ViT-B-32")
    texts = ["a photo of a cat.", "A DIAGRAM of   two dogs!", "it's 2024; naïve café", "x" * 300]
    assert tokenize(ours, texts[:1])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert torch.equal(tokenize(ours, texts), reference(texts))


def test_shipped_imagenet_names_and_templates_are_open_clips():
    assert read_lines(CLASSNAMES_FILE) == list(IMAGENET_CLASSNAMES)
    assert zero_shot_templates("80") == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert zero_shot_templates("7") == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]


def test_zero_shot_classifier_matches_open_clip():
    """open_clip's build_zero_shot_classifier and ours, from the same (small, random) model, on a few
    ImageNet classes with all 80 templates."""
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=16, width=64, layers=1)  # one head of 64, open_clip's default width
    text = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
    reference = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()
    ours = CLIP(make_config("tiny", embed_dim=32, image_size=32, patch_size=16, width=64, layers=1, heads=1, mlp_dim=256,
                            context_length=77, vocab_size=49408, text_width=64, text_heads=2, text_layers=2)).eval()
    assert load_clip_weights(ours, reference.state_dict()) == ([], [])
    names = read_lines(CLASSNAMES_FILE)[::200] + ["jack-o'-lantern"]
    expected = open_clip.build_zero_shot_classifier(reference, open_clip.get_tokenizer("ViT-B-32"), names,
                                                    OPENAI_IMAGENET_TEMPLATES, num_classes_per_batch=2)  # E x C
    tok = clip_tokenizer(os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz"), 77)
    got = zero_shot_classifier(ours, tok, names, zero_shot_templates("80"), "cpu", texts_per_batch=200)  # C x E
    assert got.shape == (6, 32)
    torch.testing.assert_close(got, expected.t(), atol=1e-5, rtol=1e-5)

