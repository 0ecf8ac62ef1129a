"""The stage commands on VLMEvalKit TSVs (SPEC 4.6): eval --rules vlmevalkit on all six benchmarks' column sets,
every sample-reading stage on a TSV, protocols and the effective generation settings in scores.json, the
checkpoint's generation_config.json set aside, and the optional --judge against a local OpenAI-compatible server.

Upstream read (open-compass/VLMEvalKit at e8e78f05): ``vlmeval/dataset/utils/multiple_choice.py`` 359-405
(``extract_answer_from_item``: can_infer first; with no judge the line is 'Z'; a judge is asked to match the
response to an option and its reply read by can_infer, three tries, then a random option), 431-437
(``eval_vanilla``); ``vlmeval/dataset/utils/mathvista.py`` 77-124 (``post_check``; ``MathVista_auxeval``: the
prefetch, else the judge extracts the answer); ``vlmeval/dataset/image_vqa.py`` 588-600 (MathVista needs a working
judge). NOVAglow646/Monet at 0893999 ``inference/load_and_gen_vllm.py`` 21-32 (the monet preset's settings).
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import threading

import pytest

from gapkern.cli import main
from gapkern.data import load_samples
from gapkern.judge import judge_records
from gapkern.protocol import load_protocol
from gapkern.vlmeval_rules import verdict

from bench_tsvs import TSVS, write_tsv
from stages import checkpoint, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["--max-new-tokens", "4", "--batch", "2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    checkpoint(folder / "plain")
    checkpoint(folder / "gap", gap_budget=2)
    for name in TSVS:
        write_tsv(folder, name)
    return folder


def run_cli(capsys, *argv, code=0):
    got = main(list(argv))
    captured = capsys.readouterr()
    assert got == code, captured.err
    return captured.out if code == 0 else captured.err


@pytest.mark.parametrize("name", sorted(TSVS))
def test_eval_judges_each_benchmarks_tsv_as_vlmevalkit(capsys, folder, tmp_path, name):
    """Every line is judged by VLMEvalKit's rules; the lines its GPT judge would score are counted and listed."""
    out = tmp_path / "out"
    printed = run_cli(capsys, "eval", "--model", str(folder / "plain"), "--samples", str(folder / f"{name}.tsv"),
                      "--rules", "vlmevalkit", "--out", str(out), *SMALL)
    samples = {s["id"]: s for s in load_samples(str(folder / f"{name}.tsv"), images=str(tmp_path / "c"))}
    records = read_jsonl(out / "plain" / "none" / "predictions.jsonl")
    assert [r["id"] for r in records] == [str(row[0]) for row in TSVS[name][1]]
    for r in records:
        expected = verdict(r["prediction"], samples[r["id"]])
        assert r["correct"] is (expected is True) and r["needs_judge"] is (expected is None)
    scores = json.loads((out / "scores.json").read_text())["plain/none"]
    assert list(scores["tasks"]) == [name] and scores["rules"] == "vlmevalkit"
    assert scores["judge_lines"] == {name: [r["id"] for r in records if r["needs_judge"]]}
    assert scores["needs_judge"] == {name: len(scores["judge_lines"][name])}
    assert f"needs judge plain/none: {name} {scores['needs_judge'][name]}" in printed
    assert os.listdir(out / "images")  # the TSV's images decoded beside the output


def test_the_protocol_and_effective_settings_are_recorded_and_the_checkpoints_generation_config_is_not_used(
        capsys, folder, tmp_path):
    """A checkpoint shipping generation_config.json (as Qwen2.5-VL-7B-Instruct does) answers as the same weights
    without one: the protocol fixes every generation setting. The shipped config also bans every token the clean
    run wrote (bad_words_ids), so a leak would change every response."""
    protocol = tmp_path / "mine.json"
    protocol.write_text(json.dumps({**load_protocol("monet"), "name": "mine", "max_new_tokens": 5,
                                    "temperature": 1.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0}))
    argv = ["--samples", str(folder / "HRBench4K.tsv"), "--protocol", str(protocol), "--batch", "2"]
    run_cli(capsys, "eval", "--model", str(folder / "gap"), "--out", str(tmp_path / "a"), *argv)
    clean = read_jsonl(tmp_path / "a" / "gap" / "none" / "predictions.jsonl")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "gap")
    written = sorted({i for r in clean for i in tokenizer(r["prediction"], add_special_tokens=False)["input_ids"]})
    assert written
    shipped = tmp_path / "shipped"
    shutil.copytree(folder / "gap", shipped)
    config = json.loads((shipped / "generation_config.json").read_text())
    config.update(repetition_penalty=1.05, top_k=1, top_p=0.001, temperature=0.1, bad_words_ids=[[i] for i in written])
    del config["_from_model_config"]  # a released checkpoint's own file, not one derived from config.json
    (shipped / "generation_config.json").write_text(json.dumps(config))
    run_cli(capsys, "eval", "--model", str(shipped), "--out", str(tmp_path / "b"), *argv)
    assert [r["prediction"] for r in read_jsonl(tmp_path / "b" / "shipped" / "none" / "predictions.jsonl")] == [
        r["prediction"] for r in clean]
    scores = json.loads((tmp_path / "b" / "scores.json").read_text())["shipped/none"]
    assert scores["protocol"] == load_protocol(str(protocol))
    assert scores["generation"] == {"temperature": 1.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0,
                                    "max_new_tokens": 5}
    assert scores["image_settings"]["min_pixels"] == 256 * 28 * 28
    assert scores["image_settings"]["max_pixels"] == 8192 * 28 * 28
    ignored = scores["checkpoint_generation_config_ignored"]
    assert (ignored["repetition_penalty"], ignored["top_k"], ignored["top_p"]) == (1.05, 1, 0.001)
    assert ignored["bad_words_ids"] == [[i] for i in written]
    # without --protocol: the gap preset with the command's own settings
    run_cli(capsys, "eval", "--model", str(folder / "plain"), "--samples", str(folder / "MMStar.tsv"),
            "--out", str(tmp_path / "c"), *SMALL)
    plain = json.loads((tmp_path / "c" / "scores.json").read_text())["plain/none"]
    assert plain["protocol"]["name"] == "gap" and plain["rules"] == "gap"
    assert plain["generation"] == {"temperature": 0.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0,
                                   "max_new_tokens": 4}


def test_every_stage_that_reads_samples_reads_a_tsv(capsys, folder, tmp_path):
    """fit-pca, build-data, curate and diagnose take a TSV as --samples (images decoded beside their output);
    curate keeps its effective generation settings and what the checkpoint's own config would have set."""
    tsv = str(folder / "HRBench4K.tsv")
    model = str(folder / "plain")
    run_cli(capsys, "fit-pca", "--model", model, "--samples", tsv, "--out", str(tmp_path / "pca"), "--rank", "2",
            "--no-whiten")
    assert os.path.isfile(tmp_path / "pca" / "head.safetensors") and os.listdir(tmp_path / "pca" / "images")
    run_cli(capsys, "build-data", "--model", model, "--samples", tsv, "--out", str(tmp_path / "data"))
    assert [s["id"] for s in load_samples(str(tmp_path / "data" / "samples.jsonl"))] == ["0", "1"]
    out = tmp_path / "cur.jsonl"
    run_cli(capsys, "curate", "--model", model, "--samples", tsv, "--out", str(out), "--n", "2",
            "--max-new-tokens", "3")
    assert [len(line["attempts"]) for line in read_jsonl(out)] == [2, 2]
    kept = json.loads((tmp_path / "cur.jsonl.settings.json").read_text())
    assert kept["generation"] == {"temperature": 1.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0,
                                  "max_new_tokens": 3}
    assert "checkpoint_generation_config_ignored" in kept
    run_cli(capsys, "diagnose", "--model", model, "--samples", tsv, "--out", str(tmp_path / "diag"),
            "--latent-budget", "2", "--max-new-tokens", "3", "--calibration", "none")
    assert os.path.isfile(tmp_path / "diag" / "diagnosis.json")
    err = run_cli(capsys, "fit-pca", "--model", model, "--samples", write_tsv(tmp_path, "Other", *TSVS["MMStar"]),
                  "--out", str(tmp_path / "p2"), code=2)
    assert "--samples: " in err and "give its category" in err and err.count("\n") == 1


# ---- the optional judge ----------------------------------------------------------------------------------------

class Judge:
    """A local OpenAI-compatible endpoint: GET /v1/models, POST /v1/chat/completions answered by ``reply``."""

    def __init__(self, reply):
        self.reply, self.prompts = reply, []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.send({"object": "list", "data": [{"id": "local-judge", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions" and body["model"] == "local-judge"
                prompt = body["messages"][0]["content"]
                owner.prompts.append(prompt)
                self.send({"choices": [{"index": 0, "message": {"role": "assistant",
                                                                  "content": owner.reply(prompt)}}]})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_the_judge_decides_only_the_lines_that_need_it_and_never_guesses():
    mcq = {"id": "m", "task": "MMStar", "question": "How many cats?", "answer": "D", "choices": ["1", "2", "3", "4"]}
    vista = {"id": "v", "task": "MathVista_MINI", "question": "How many dots?", "answer": "14",
             "meta": {"question_type": "free_form", "answer_type": "integer", "answer": "14"}}
    stuck = {**mcq, "id": "s"}
    records = [{"id": "m", "prediction": "there are four of them, I counted twice", "correct": False,
                "needs_judge": True},
               {"id": "v", "prediction": "Counting row by row gives 14 dots.", "correct": False, "needs_judge": True},
               {"id": "s", "prediction": "no idea", "correct": False, "needs_judge": True},
               {"id": "x", "prediction": "D", "correct": True, "needs_judge": False}]
    replies = {"four of them": "D", "row by row": "14", "no idea": "I cannot tell"}
    with Judge(lambda p: next(v for k, v in replies.items() if k in p)) as judge:
        decided = judge_records(records, [mcq, vista, stuck, {**mcq, "id": "x"}], judge.url, "local-judge")
    assert decided == 2
    assert [(r["correct"], r["needs_judge"]) for r in records] == [(True, False), (True, False), (False, True),
                                                                   (True, False)]
    assert records[2]["judge"] == ["I cannot tell"] * 3  # three tries, then left to the user: no random option
    assert "judge" not in records[3] and len(judge.prompts) == 5
    assert "A. 1 B. 2 C. 3 D. 4" in judge.prompts[0] and "How many dots?" in judge.prompts[1]


def test_eval_with_judge_scores_the_lines_vlmevalkit_leaves_to_it(capsys, folder, tmp_path):
    with Judge(lambda prompt: "D") as judge:
        printed = run_cli(capsys, "eval", "--model", str(folder / "plain"), "--samples", str(folder / "MMStar.tsv"),
                          "--rules", "vlmevalkit", "--judge", judge.url, "--out", str(tmp_path / "out"), *SMALL)
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())["plain/none"]
    before = read_jsonl(tmp_path / "out" / "plain" / "none" / "predictions.jsonl")
    after = read_jsonl(tmp_path / "out" / "plain" / "none" / "judged.jsonl")
    asked = [r["id"] for r in before if r["needs_judge"]]
    assert scores["judge"] == {"url": judge.url, "model": "local-judge", "asked": len(asked),
                               "decided": len(asked)}
    assert len(judge.prompts) == len(asked) and scores["needs_judge"] == {"MMStar": 0}
    assert all(r["correct"] for r in after if r["id"] in asked)  # MMStar's answer is D, the judge's reply
    assert f"the judge decided {len(asked)} of {len(asked)}" in printed
    err = run_cli(capsys, "eval", "--model", str(folder / "plain"), "--samples", str(folder / "MMStar.tsv"),
                  "--judge", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "o2"), code=2)
    assert "--judge: only with --rules vlmevalkit" in err


def test_eval_scores_the_papers_five_benchmarks_together(capsys, folder, tmp_path):
    """Five TSVs in one run: their indexes repeat, so ids are FILE_STEM/index; Avg-P averages HRBench4K, MMStar
    and MME-RealWorld-Lite, Avg-R MathVista_MINI and WeMath (SPEC 4.6)."""
    names = ["HRBench4K", "MMStar", "MME-RealWorld-Lite", "MathVista_MINI", "WeMath"]
    out = tmp_path / "out"
    run_cli(capsys, "eval", "--model", str(folder / "plain"), "--rules", "vlmevalkit", "--out", str(out),
            "--samples", ",".join(str(folder / f"{n}.tsv") for n in names), *SMALL)
    scores = json.loads((out / "scores.json").read_text())["plain/none"]
    assert sorted(scores["tasks"]) == sorted(names)
    assert scores["avg_p"] == pytest.approx(sum(scores["tasks"][n] for n in names[:3]) / 3)
    assert scores["avg_r"] == pytest.approx(sum(scores["tasks"][n] for n in names[3:]) / 2)
    ids = [r["id"] for r in read_jsonl(out / "plain" / "none" / "predictions.jsonl")]
    assert ids[:2] == ["HRBench4K/0", "HRBench4K/1"] and "MMStar/5" in ids
    assert sorted(os.listdir(out / "images")) == sorted(names)  # each file's images in its own folder
