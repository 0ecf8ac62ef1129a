"""The training collator on the tiny word-level tokenizer: tokens, labels, slots, images and targets by hand."""
from __future__ import annotations

import pytest
import torch

from gapkern.data import TargetReader, image_inputs, load_samples
from gapkern.models import GapQwen2_5_VLForConditionalGeneration
from gapkern.testing import tiny_head, tiny_qwen2_5_vl, tiny_tokenizer
from gapkern.train import GapCollator
from train_data import write_image, write_jsonl, write_targets

pytestmark = pytest.mark.usefixtures("one_thread")

K, DIM = 2, 64
# tiny ids: 0 pad, 1 <|im_end|>, 2 <latent>, 3 </latent>, 4 <latent_pad>, 5 <|image_pad|>, 7/8 vision start/end,
# 9 <|im_start|>, 10/11 <parser> </parser>, wN -> N; any other word (user, A., <think>w40, ...) -> 16 (unknown)
IM_START, IM_END, START, END, PAD, IMG, VS, VE, P_OPEN, P_CLOSE, UNK = 9, 1, 2, 3, 4, 5, 7, 8, 10, 11, 16


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_5_vl(seed=0, model_class=GapQwen2_5_VLForConditionalGeneration)


@pytest.fixture
def data(tmp_path):
    (tmp_path / "img").mkdir()
    write_image(tmp_path / "img" / "a.png", 56, seed=1)   # 4 x 4 patches -> 4 visual tokens
    write_image(tmp_path / "img" / "b.png", 84, seed=2)   # 6 x 6 patches -> 9 visual tokens
    lines = [
        {"id": "q1", "image": "img/a.png", "question": "w20 w21", "choices": ["w30", "w31"], "answer": "B",
         "category": "perception", "task": "t",
         "steps": [{"text": "w40"}, {"latent": {"image": "img/a.png"}, "parser": "w50"}, {"text": "w41"}]},
        {"id": "q2", "question": "w22", "answer": "w60", "category": "reasoning", "task": "t",
         "steps": [{"text": "w42"}, {"latent": {"image": "img/a.png"}, "parser": "w51"}, {"text": "w43"}]},
        {"id": "q3", "image": "img/b.png", "question": "w23", "answer": "w61", "category": "reasoning", "task": "t",
         "steps": [{"latent": {"image": "img/b.png", "box": [0, 0, 56, 56]}, "parser": "w52"}, {"text": "w44"},
                   {"latent": {"image": "img/a.png"}, "parser": "w53"}]},
    ]
    samples = load_samples(write_jsonl(tmp_path / "samples.jsonl", lines))
    values = write_targets(tmp_path, samples, K, DIM)
    return samples, values, TargetReader(str(tmp_path))


def collator(tiny, reader, **kw):
    model, ids = tiny
    return GapCollator(tiny_tokenizer(ids), model.config, ids.gap_config(latent_budget=K), targets=reader, **kw)


def prompt_ids(question_words, visual, choices):
    """<|im_start|> user \n [<vision_start> <image_pad>*n <vision_end>] question [choices] answer-format <|im_end|>
    \n <|im_start|> assistant \n  (gapkern.data.question_text: the last line says where the answer goes,
    7 words with choices, 6 without, none of them in the tiny vocabulary)"""
    image = [VS] + [IMG] * visual + [VE] if visual else []
    return [IM_START, UNK] + image + question_words + [UNK] * (7 if choices else 6) + [IM_END, IM_START, UNK]


def test_hard_easy_and_two_span_rows_by_hand(tiny, data):
    samples, values, reader = data
    q1, q2, q3 = (dict(s, hard=h) for s, h in zip(samples, (True, False, True)))
    batch = collator(tiny, reader)([q1, q2, q3])

    # q1, hard: "<think>w40 \n <latent> pad pad </latent> <parser> w50 </parser> \n w41</think><answer>B</answer>"
    p1 = prompt_ids([20, 21, UNK, 30, UNK, 31], 4, True)
    r1 = [UNK, START, PAD, PAD, END, P_OPEN, 50, P_CLOSE, UNK, IM_END]
    # q2, easy: its latent step and description are dropped: "<think>w42 \n w43</think><answer>w60</answer>"
    p2 = prompt_ids([22], 0, False)
    r2 = [UNK, UNK, IM_END]
    # q3, hard, two spans: "<think>" + <latent> ... </parser> \n w44 \n <latent> ... </parser> + "</think>..."
    p3 = prompt_ids([23], 9, False)
    r3 = [UNK, START, PAD, PAD, END, P_OPEN, 52, P_CLOSE, 44, START, PAD, PAD, END, P_OPEN, 53, P_CLOSE, UNK, IM_END]
    width = len(p3) + len(r3)
    assert batch["input_ids"].shape[1] == width  # the longest row, q3
    for b, (p, r) in enumerate(((p1, r1), (p2, r2), (p3, r3))):
        row = p + r
        assert batch["input_ids"][b].tolist() == row + [0] * (width - len(row))  # right padding, pad id 0
        assert batch["attention_mask"][b].tolist() == [1] * len(row) + [0] * (width - len(row))
        assert batch["labels"][b].tolist() == [-100] * len(p) + r + [-100] * (width - len(row))
    assert batch["mm_token_type_ids"].tolist() == (batch["input_ids"] == IMG).long().tolist()

    # the slots: row 0 has one span, row 2 two; latent_targets follow batch-major, position order
    slots = (batch["input_ids"] == PAD).nonzero().tolist()
    assert [b for b, _ in slots] == [0, 0, 2, 2, 2, 2]
    expected = torch.cat([values["q1/1"], values["q3/0"], values["q3/2"]])
    assert torch.equal(batch["latent_targets"], expected)

    # images of the rows that have one, in row order
    want = [image_inputs(samples[0]["images"][0], tiny[0].config.vision_config),
            image_inputs(samples[2]["images"][0], tiny[0].config.vision_config)]
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 6]]
    assert torch.equal(batch["pixel_values"], torch.cat([w["pixel_values"] for w in want]))


def test_no_curation_means_every_line_is_hard(tiny, data):
    samples, values, reader = data
    batch = collator(tiny, reader)(samples[:2])
    assert int((batch["input_ids"] == PAD).sum()) == 2 * K
    assert torch.equal(batch["latent_targets"], torch.cat([values["q1/1"], values["q2/1"]]))


def test_easy_only_batch_has_no_slot_and_no_image(tiny, data):
    samples, _, reader = data
    batch = collator(tiny, reader)([dict(samples[1], hard=False)])
    assert batch["latent_targets"].shape == (0, DIM)
    assert "pixel_values" not in batch and "image_grid_thw" not in batch
    assert not (batch["input_ids"] == PAD).any()


def test_the_batch_runs_through_the_training_forward(tiny, data):
    samples, _, reader = data
    model, ids = tiny
    model.set_gap(tiny_head(model, rank=8), ids.gap_config(latent_budget=K))
    batch = collator(tiny, reader)([dict(samples[0], hard=True), dict(samples[1], hard=False), samples[2]])
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.latent_loss > 0 and out.text_loss > 0


def test_targets_errors_name_the_sample(tiny, data):
    samples, _, reader = data
    model, ids = tiny
    with pytest.raises(ValueError, match=r"targets: sample 'q1' has latent steps but no target folder"):
        collator(tiny, None)([samples[0]])
    wrong_k = GapCollator(tiny_tokenizer(ids), model.config, ids.gap_config(latent_budget=3), targets=reader)
    with pytest.raises(ValueError, match=r"targets: sample 'q1' has 3 latent slots in its tokens but 2 target rows"):
        wrong_k([samples[0]])
