"""VLMEvalKit TSVs as sample files, VLMEvalKit's rule-based judging, evaluation protocols (SPEC 4.1, 4.6).

Upstream read (open-compass/VLMEvalKit at e8e78f05): ``vlmeval/dataset/image_base.py`` lines 146-180 (an image
field of at most 64 characters is another row's index; a "[...]" field is a list of images) and 255-290
(``{index}.png`` / ``{index}_{i}.png``); ``vlmeval/dataset/image_mcq.py`` 212-247 (A..Z option columns, hint, the
MCQ prompt), 1053-1095 (MME-RealWorld: ``<answer>`` then ``extract_characters_regex``), 1315-1365 (HRBench:
mcq_vanilla_eval then ``report_acc_hrbench``), 1497-1552 (WeMath without a judge); ``vlmeval/utils/
matching_util.py`` 18-61 (``can_infer_option``: the letter among the last four tokens), 107-127
(``can_infer_text``, ``can_infer``); ``vlmeval/dataset/utils/multiple_choice.py`` 359-385 (no letter and no
judge: the line fails; with a judge it is asked), 585-610; ``vlmeval/dataset/utils/hrbench.py`` (per-cycle
average); ``vlmeval/dataset/utils/mathvista.py`` 77-113 (``post_check`` prefetch); ``vlmeval/dataset/utils/
wemath.py`` 28-43. NOVAglow646/Monet at 0893999: ``inference/load_and_gen_vllm.py`` lines 21-32 and README.md
line 224 (the system prompt).
"""
from __future__ import annotations

import base64
import io
import json
import os

import PIL.Image
import pytest

from gapkern.data.benchfiles import convert_tsv, load_tsv
from gapkern.cli import main
from gapkern.data import SampleError, load_samples
from gapkern.stages.scoring import choice_letter, is_correct, judge_needed, prediction, score
from gapkern.protocol import PRESETS, load_protocol, logits_processors, own_generation_config, user_text
from gapkern.vlmeval_rules import can_infer, extract_characters_regex

from bench_tsvs import RED, TSVS, write_tsv


@pytest.mark.parametrize("name", sorted(TSVS))
def test_each_benchmarks_tsv_reads_as_samples(tmp_path, name):
    samples = load_samples(write_tsv(tmp_path, name), images=str(tmp_path / "cache"))
    header, rows = TSVS[name]
    assert [s["id"] for s in samples] == [str(r[0]) for r in rows]
    for s in samples:
        assert s["task"] == name
        assert s["category"] == ("reasoning" if name in ("MathVista_MINI", "WeMath") else "perception")
        assert s["images"] and all(os.path.isfile(p) and p.startswith(str(tmp_path / "cache")) for p in s["images"])
        assert "image" not in s["meta"] and "question" not in s["meta"]
    if "category" in header:
        assert samples[0]["meta"]["category"] == rows[0][header.index("category")]


def test_choices_answers_and_images_follow_vlmevalkit(tmp_path):
    hr = load_tsv(write_tsv(tmp_path, "HRBench4K"), images=str(tmp_path / "c"))
    assert hr[0]["choices"] == ["red", "blue", "green", "white"] and hr[1]["answer"] == "B"
    assert hr[1]["images"] == hr[0]["images"]  # row 1's image field "0" is row 0's image
    decoded = PIL.Image.open(hr[0]["images"][0])
    assert decoded.tobytes() == PIL.Image.open(io.BytesIO(base64.b64decode(RED))).tobytes()  # the row's own image
    mme = load_tsv(write_tsv(tmp_path, "MME-RealWorld-Lite"), images=str(tmp_path / "c"))
    assert [os.path.basename(p) for p in mme[0]["images"]] == ["7_0.png", "7_1.png"]
    assert len(mme[0]["choices"]) == 5
    vista = load_tsv(write_tsv(tmp_path, "MathVista_MINI"), images=str(tmp_path / "c"))
    assert "choices" not in vista[0] and vista[0]["answer"] == "14"  # free-form keeps its number
    assert vista[1]["choices"] == ["3/11", "8/11", "6/11"] and vista[1]["answer"] == "B"
    wemath = load_tsv(write_tsv(tmp_path, "WeMath"), images=str(tmp_path / "c"))
    assert wemath[0]["meta"]["hint"] == "Use the figure." and wemath[0]["meta"]["key"] == "2steps_1"


def test_images_are_decoded_once(tmp_path):
    path = write_tsv(tmp_path, "MMStar")
    first = load_tsv(path, images=str(tmp_path / "c"))[0]["images"][0]
    stamp = os.stat(first).st_mtime_ns
    load_tsv(path, images=str(tmp_path / "c"))
    assert os.stat(first).st_mtime_ns == stamp


def test_other_benchmarks_need_a_category_and_bad_rows_name_their_line(tmp_path):
    header, rows = TSVS["MMStar"]
    path = write_tsv(tmp_path, "MyBench", header, rows)
    with pytest.raises(SampleError, match="--category"):
        load_tsv(path)
    assert load_tsv(path, category="reasoning")[0]["category"] == "reasoning"
    bad = write_tsv(tmp_path, "MMStar", header, [rows[0], [6, "q", "E", "c", "l", "1", "2", "3", "4", RED]])
    with pytest.raises(SampleError, match=r"MMStar.tsv:3:answer: expected a letter A-D"):
        load_tsv(bad)
    ref = write_tsv(tmp_path, "HRBench8K", TSVS["HRBench8K"][0], [[0, "q", "A", "c", "0", "a", "b", "", "", "9"]])
    with pytest.raises(SampleError, match=r"HRBench8K.tsv:2:image: '9' refers to no row"):
        load_tsv(ref)


def test_convert_tsv_writes_a_sample_file(tmp_path, capsys):
    out = tmp_path / "train" / "hr.jsonl"
    os.makedirs(out.parent)
    assert main(["convert-tsv", "--tsv", write_tsv(tmp_path, "HRBench4K"), "--out", str(out)]) == 0
    assert "lines       2 (HRBench4K, perception)" in capsys.readouterr().out
    back = load_samples(str(out))
    assert [s["choices"] for s in back] == [s["choices"] for s in load_tsv(str(tmp_path / "HRBench4K.tsv"))]
    assert json.loads(out.read_text().splitlines()[0])["images"] == ["hr.images/0.png"]
    assert main(["convert-tsv", "--tsv", str(tmp_path / "nope.tsv"), "--out", str(out)]) == 2
    assert "--tsv: no file" in capsys.readouterr().err


# ---- VLMEvalKit's verdicts, case by case from its code ---------------------------------------------------------

MCQ = {"task": "MMStar", "answer": "B", "choices": ["red", "green", "blue", "gray"], "meta": {}}
CASES = [  # (response, sample, VLMEvalKit's verdict: True / False / None = its GPT judge would be asked)
    ("B", MCQ, True),
    ("(B) green", MCQ, True),
    ("The answer is B.", MCQ, True),  # B is among the last four tokens
    ("B. It is green because the ring in the lower left is painted that way", MCQ, None),  # not among the last 4
    ("A is red, B is green. So the answer is B.", MCQ, True),  # two letters stand alone; "answer is B" finds it
    ("A or B", MCQ, None),  # two letters, no "answer is"
    ("green", MCQ, True),  # can_infer_text: the one option text contained
    ("greenish blue", MCQ, None),  # two option texts contained
    ("The correct answer is **C**. Here's why: the shape shows more than you think at first glance", MCQ, False),
    ("Cannot determine the answer", MCQ, False),  # a refusal is 'Z'
    ("Z", MCQ, False),
    ("A", {"task": "HRBench4K", "answer": "A",
                                                   "choices": ["x", "y"], "meta": {}}, True),
    ("<answer>b</answer>", {"task": "MME-RealWorld-Lite", "answer": "B", "choices": list("vwxyz"), "meta": {}},
     True),  # the tag's text is upper-cased
    ("The answer is (C) wait", {"task": "MME-RealWorld-Lite", "answer": "B", "choices": list("vwxyz"),
                                "meta": {}}, False),
    ("nothing to see at all in this image that would help me to decide it", {
        "task": "MME-RealWorld-Lite", "answer": "A", "choices": list("vwxyz"), "meta": {}}, False),
    ("14", {"task": "MathVista_MINI", "answer": "14", "meta": {"question_type": "free_form",
                                                             "answer_type": "integer", "answer": "14"}}, True),
    ("The answer is 14", {"task": "MathVista_MINI", "answer": "14", "meta": {
        "question_type": "free_form", "answer_type": "integer", "answer": "14"}}, None),  # int() fails: judge
    ("13", {"task": "MathVista_MINI", "answer": "14", "meta": {"question_type": "free_form",
                                                             "answer_type": "integer", "answer": "14"}}, None),
    ("1.5", {"task": "MathVista_MINI", "answer": "1.5", "meta": {"question_type": "free_form",
                                                               "answer_type": "float", "answer": "1.5"}}, True),
    ("0", {"task": "MathVista_MINI", "answer": "0", "meta": {"question_type": "free_form",
                                                           "answer_type": "integer", "answer": "0"}}, None),
    # post_check(prefetch=True) returns the value itself: 0 is falsy, so MathVista_auxeval asks the judge
    ("[1, 2]", {"task": "MathVista_MINI", "answer": "[1, 2]", "meta": {"question_type": "free_form",
                                                                     "answer_type": "list", "answer": "[1, 2]"}},
     False),  # post_check compares str(None) for a non-numeric free-form answer: never a hit, judge or not
    ("8/11", {"task": "MathVista_MINI", "answer": "B", "choices": ["3/11", "8/11", "6/11"], "meta": {
        "question_type": "multi_choice", "choices": "['3/11', '8/11', '6/11']", "answer_option": "B"}}, True),
    ("(A) 3/11", {"task": "MathVista_MINI", "answer": "B", "choices": ["3/11", "8/11", "6/11"], "meta": {
        "question_type": "multi_choice", "choices": "['3/11', '8/11', '6/11']", "answer_option": "B"}}, False),
    ("Answer: C.", {"task": "WeMath", "answer": "C", "choices": list("abcde"), "meta": {}}, True),
    ("I think B. Answer: <C>", {"task": "WeMath", "answer": "C", "choices": list("abcde"), "meta": {}}, True),
    ("The angle is 60 degrees", {"task": "WeMath", "answer": "C", "choices": list("abcde"), "meta": {}}, False),
]


@pytest.mark.parametrize("response, sample, expected", CASES)
def test_verdicts_equal_vlmevalkits(response, sample, expected):
    assert is_correct(response, sample, rules="vlmevalkit") is (expected is True)
    assert judge_needed(response, sample) is (expected is None)


def test_can_infer_and_extraction_details():
    choices = {"A": "red", "B": "green"}
    assert can_infer("I pick A", choices) == "A"
    assert can_infer("A quick look: it is the first one", choices) is False  # A not among the last four tokens
    assert can_infer("the answer is b", {"A": "x", "B": "y"}) == "B"  # the case-insensitive "answer is" match
    assert extract_characters_regex("") == "A"  # '' is in '(A)': VLMEvalKit's quirk, kept
    assert extract_characters_regex("The best answer is D") == "D"


def test_hrbench_scores_the_mean_over_cycles_and_judge_lines_are_listed():
    sample = {"task": "HRBench4K", "category": "perception", "answer": "A", "choices": ["x", "y"]}
    lines = [prediction({**sample, "id": str(i), "meta": {"cycle_category": str(c)}}, text, rules="vlmevalkit")
             for i, (c, text) in enumerate([(0, "A"), (0, "B"), (0, "B"), (1, "A"), (1, "maybe x or y")])]
    result = score(lines)
    assert result["tasks"]["HRBench4K"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert result["needs_judge"] == {"HRBench4K": 1} and result["judge_lines"] == {"HRBench4K": ["4"]}


# ---- gapkern's own rules, fixed as SPEC 4.6 says ---------------------------------------------------------------

@pytest.mark.parametrize("given, letter", [
    ("A is red, B is green. So the answer is B.", "B"), ("A or B", None), ("B", "B"), ("(c)", "C"),
    ("answer: B", "B"), ("I choose C, not A", "C"), ("green", "B"), ("It is B.", "B"),
])
def test_gap_rules_pick_the_letter_the_answer_commits_to(given, letter):
    assert choice_letter(given, ["red", "green", "blue"]) == letter


# ---- protocols -------------------------------------------------------------------------------------------------

def test_presets_and_files(tmp_path):
    monet = load_protocol("monet")
    assert (monet["temperature"], monet["top_k"], monet["top_p"], monet["repetition_penalty"],
            monet["max_new_tokens"], monet["min_pixels"], monet["max_pixels"]) == (
        0.1, 50, 0.8, 1.01, 4096, 256 * 28 * 28, 8192 * 28 * 28)
    assert monet["system_prompt"].endswith("Put your final answer in \\boxed{}.")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"temperature": 0.5, "top_p": 0.9}))
    mine = load_protocol(str(path))
    assert mine["name"] == "mine" and mine["top_p"] == 0.9 and mine["prompt"] == "gap"
    path.write_text(json.dumps({"temprature": 0.5}))
    with pytest.raises(ValueError, match="unknown field 'temprature'"):
        load_protocol(str(path))
    path.write_text(json.dumps({"top_p": 2}))
    with pytest.raises(ValueError, match=r"top_p: expected null or a number in \(0, 1\], got 2"):
        load_protocol(str(path))


def test_prompts_of_both_presets():
    sample = {"question": "Which colour?", "choices": ["red", "green"], "meta": {"hint": "Look left."}}
    assert user_text(sample, load_protocol("monet")) == (
        "Hint: Look left.\nQuestion: Which colour?\nOptions:\nA. red\nB. green\n"
        "Please select the correct answer from the options above. \n")
    assert user_text(sample, None) == ("Which colour?\nA. red\nB. green\n"
                                       "Answer with the option's letter inside <answer></answer>.")
    assert user_text(sample, PRESETS["gap"]) == user_text(sample, None)


def test_the_vlmevalkit_prompt_is_each_benchmarks_own():
    """VLMEvalKit e8e78f05 vlmeval/dataset/image_base.py 320-340 (MathVista: the question alone),
    image_mcq.py 1029-1049 (MME-RealWorld: question, its options column, MMERealWorld.SYS) and 1457-1490
    (WeMath: Hint / Question / Options, no "Please select")."""
    monet = load_protocol("monet")
    vista = {"task": "MathVista_MINI", "question": "Hint: pick one.\nQuestion: Which?\nChoices:\n(A) 1\n(B) 2",
             "choices": ["1", "2"], "meta": {}}
    assert user_text(vista, monet) == vista["question"]
    mme = {"task": "MME-RealWorld-Lite", "question": "What is written?", "choices": list("abcde"),
           "meta": {"multi-choice options": "(A) stop\n(B) go"}}
    assert user_text(mme, monet) == ("What is written? (A) stop\n(B) go\nSelect the best answer to the above "
                                     "multiple-choice question based on the image. Respond with only the letter "
                                     "(A, B, C, D, or E) of the correct option. \nThe best answer is:")
    wemath = {"task": "WeMath", "question": "Angle?", "choices": ["30", "45"], "meta": {"hint": "Use it."}}
    assert user_text(wemath, monet) == "Hint: Use it.\nQuestion: Angle?\nOptions:\nA. 30\nB. 45\n"


def test_the_checkpoints_generation_config_is_set_aside():
    from transformers import GenerationConfig

    class Model:
        generation_config = GenerationConfig(repetition_penalty=1.05, top_k=1, top_p=0.001, temperature=0.1,
                                             eos_token_id=[7, 8], pad_token_id=8)

    model, saved = Model(), Model.generation_config
    with own_generation_config(model) as aside:
        assert model.generation_config.repetition_penalty in (None, 1.0)
        assert model.generation_config.eos_token_id == [7, 8]
        assert aside["repetition_penalty"] == 1.05 and aside["top_k"] == 1
    assert model.generation_config is saved


def test_the_protocols_processors_penalise_then_warp_then_draw():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper

    chain = logits_processors(load_protocol("monet"), [1, 2], prompt_len=1)
    assert isinstance(chain[0], RepetitionPenaltyLogitsProcessor) and isinstance(chain[2], TopKLogitsWarper)
    scores = torch.randn(2, 60)
    ids = torch.tensor([[3, 4], [5, 6]])
    out = scores
    for p in chain:
        out = p(ids, out)
    kept = TopKLogitsWarper(50)(ids, scores)
    assert all(bool(torch.isfinite(kept[r, out[r].argmax()])) for r in range(2))  # drawn within the top 50
    greedy = logits_processors(PRESETS["gap"], [1], prompt_len=1)
    assert len(greedy) == 1 and greedy[0].temperature == 0.0
