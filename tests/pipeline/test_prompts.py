"""The question prompt every GAP stage asks with: question_text, and the batched chat prompts of gapkern.prompts."""
from __future__ import annotations

import pytest
import torch

from gapkern.data import question_text, uses_latents
from gapkern.testing import tiny_qwen2_5_vl, tiny_tokenizer
from gapkern.data.images import read_image
from gapkern.data.prompts import chat_inputs
from gapkern.prompts import expand_images, prompt_batch, prompt_messages

from stages import images


def test_question_text_with_and_without_choices():
    mc = {"question": " Which colour is the ring? ", "choices": ["red", "green", "blue"], "answer": "B"}
    assert question_text(mc) == ("Which colour is the ring?\nA. red\nB. green\nC. blue\n"
                                 "Answer with the option's letter inside <answer></answer>.")
    assert question_text({"question": "How many?", "answer": 3}) == (
        "How many?\nGive the final answer inside <answer></answer>.")


def test_uses_latents_unless_curated_easy():
    assert uses_latents({}) and uses_latents({"hard": True}) and not uses_latents({"hard": False})


def test_prompt_messages_put_the_images_first():
    sample = {"question": "Q?", "answer": "x", "images": ["/a.png", "/b.png"]}
    assert prompt_messages(sample) == [{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": question_text(sample)}]}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return images(tmp_path_factory.mktemp("prompts"))


def test_prompt_batch_is_chat_inputs_per_row_left_padded(folder):
    model, ids = tiny_qwen2_5_vl()
    tokenizer = tiny_tokenizer(ids)
    img = [str(folder / "img" / f"{i}.png") for i in range(3)]
    samples = [{"question": "What is shown?", "answer": "x", "images": [img[0]]},
               {"question": "How many?", "answer": 3, "images": []},
               {"question": "Which differs?", "choices": ["left", "right"], "answer": "A", "images": [img[1], img[2]]}]
    batch = prompt_batch(model, tokenizer, samples)
    lengths = batch["attention_mask"].sum(1).tolist()
    width = batch["input_ids"].shape[1]
    assert width == max(lengths) and lengths[0] == width
    for row, length in enumerate(lengths):  # left padding: the prompt ends in the last column
        assert batch["attention_mask"][row].tolist() == [0] * (width - length) + [1] * length
        assert (batch["input_ids"][row, :width - length] == tokenizer.pad_token_id).all()
    single = chat_inputs(model, tokenizer, question_text(samples[0]), read_image(img[0], 28, 56 * 56, 28 * 28 * 1280))
    torch.testing.assert_close(batch["input_ids"][:1], single["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(batch["mm_token_type_ids"][:1], single["mm_token_type_ids"], rtol=0, atol=0)
    grids = batch["image_grid_thw"].tolist()
    assert grids == [[1, 16, 16], [1, 12, 8], [1, 6, 10]]  # the three images, in row order
    assert batch["pixel_values"].shape[0] == 256 + 96 + 60
    torch.testing.assert_close(batch["pixel_values"][:256], single["pixel_values"], rtol=0, atol=0)
    per_row = batch["mm_token_type_ids"].sum(1).tolist()
    assert per_row == [64, 0, 24 + 15] and (batch["mm_token_type_ids"] == (batch["input_ids"] == ids.image_pad)).all()


def test_expand_images_needs_one_placeholder_per_image():
    assert expand_images("a<i>b<i>c", "<i>", [2, 1]) == "a<i><i>b<i>c"
    with pytest.raises(ValueError, match=r"placed 1 '<i>' for 2 image\(s\)"):
        expand_images("a<i>b", "<i>", [1, 1])
