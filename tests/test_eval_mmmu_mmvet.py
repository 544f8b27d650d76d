"""ftz-eval on MMMU and MM-Vet: the official response parsing and aggregation on hand-made
answers (expected values worked out by hand), the readers on tiny files in the benchmarks' own
layouts (MMMU's parquet files written here with pyarrow), MM-Vet's grader against a local fake
OpenAI-compatible server (no network), and the CLI end to end with a fake predictor (no model
runs: the shipped default checkpoint only names the column)."""

import io
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import ftz_edge
from ftz_edge.evaluation import cli, metrics, readers, scoring
from ftz_edge.evaluation.errors import EvalDataError
from ftz_edge.evaluation.grader import ChatClient, GraderConfig, GraderError, grade_answer, grade_entries
from ftz_edge.evaluation.questions import SHORT_ANSWER

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CHOICE = readers.MMMU_CHOICE_LINE


def _png_bytes(color=(200, 30, 30), size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- MMMU: parsing a response by the MMMU repo's rules ------------------------------------

OPTIONS = ["red apple", "green pear", "blue plum", "yellow banana"]


@pytest.mark.parametrize("response, letter, how", [
    ("B", "B", "letter"),  # a letter alone
    ("B.", "B", "letter"),  # end punctuation is stripped first
    ("(B)", "B", "bracket"),
    ("(B) green pear", "B", "bracket"),
    ("The answer is C", "C", "letter"),  # " C " inside the padded response
    ("The answer is C.", "C", "letter"),
    ("Answer: D", "D", "letter"),
    ("(A) or maybe (C)", "C", "bracket"),  # several: the one written last
    ("A or C", "C", "letter"),
    ("(A) is wrong, C is right", "A", "bracket"),  # a bracketed letter wins over a bare one
    ("I am quite sure that it shows a blue plum", "C", "content"),  # > 5 words: the option's text
    ("It is a green pear, not a red apple at all", "A", "content"),  # several texts: the last one
])
def test_mmmu_choice_parsing_follows_the_official_rules(response, letter, how):
    assert metrics.mmmu_parse_choice(response, OPTIONS, "validation_Art_1") == (letter, how)


def test_mmmu_choice_fallback_is_random_but_fixed_by_id_and_seed():
    # Nothing parsable ("blue plum" alone is not > 5 words, "Cat" is no letter on its own):
    # a random letter, drawn from random.Random("<seed>/<id>") so reruns and subsets agree.
    for response in ("blue plum", "Cat", ""):
        letter, how = metrics.mmmu_parse_choice(response, OPTIONS, "validation_Art_7")
        assert how == "random"
        assert letter == random.Random("42/validation_Art_7").choice(["A", "B", "C", "D"])
    assert metrics.mmmu_parse_choice("", OPTIONS, "validation_Art_7", seed=1)[0] == \
        random.Random("1/validation_Art_7").choice(["A", "B", "C", "D"])


@pytest.mark.parametrize("response, gold, correct", [
    ("12.5", "12.5", True),
    ("The answer is 12.50", "12.5", True),  # numbers compare as floats rounded to 2 places
    ("so x = 12.499", "12.5", True),  # 12.499 rounds to 12.5
    ("1,000 dollars", "1000", True),  # thousands commas
    ("13", "12.5", False),
    ("Tampa", ["Tampa", "Florida"], True),  # a list of accepted answers
    ("The capital is tampa", ["Tampa", "Florida"], True),  # text: the normalised gold inside a candidate
    ("b", "B", True),  # a one-character text becomes " b" and "b " on both sides
    ("it is b here", "B", True),  # the key response "b here" holds "b "
    ("abba", "B", False),  # a one-character gold must stand apart: no " b" / "b " in "abba"
    ("", "12.5", False),
])
def test_mmmu_open_answers_follow_eval_open(response, gold, correct):
    assert metrics.mmmu_open_correct(gold, metrics.mmmu_parse_open(response)) is correct


def test_mmmu_open_parsing_keeps_the_shortest_tail_after_an_indicator():
    # "is " and "answer " both occur: the shorter tail ("5 apples") is the key response,
    # and its number is a candidate too.
    assert metrics.mmmu_parse_open("The final answer is 5 apples.") == ["5 apples", 5.0]
    assert metrics.mmmu_parse_open("Paris") == ["paris"]


def test_mmmu_aggregation_weights_subjects_by_their_questions():
    entries = [
        # Math (Science): 2 of 3 right; Biology (Science): 1 of 1; Art (Art and Design): 0 of 1.
        {"id": "validation_Math_1", "group": "Math", "question_type": "multiple-choice", "answer": "A",
         "options": ["1", "2"], "prediction": "A", "images": 1},
        {"id": "validation_Math_2", "group": "Math", "question_type": "multiple-choice", "answer": "B",
         "options": ["1", "2"], "prediction": "(B)", "images": 2},
        {"id": "validation_Math_3", "group": "Math", "question_type": "open", "answer": "7",
         "options": [], "prediction": "8", "images": 1},
        {"id": "validation_Biology_1", "group": "Biology", "question_type": "open", "answer": "mitosis",
         "options": [], "prediction": "It is mitosis", "images": 1},
        {"id": "validation_Art_1", "group": "Art", "question_type": "multiple-choice", "answer": "A",
         "options": ["x", "y"], "prediction": "B", "images": 1},
    ]
    scores = scoring.score("mmmu", entries)
    got = scores.metrics
    assert got["mmmu/Math/accuracy"] == pytest.approx(100 * 2 / 3)
    assert got["mmmu/Biology/accuracy"] == pytest.approx(100.0)
    assert got["mmmu/science/accuracy"] == pytest.approx(100 * 3 / 4)  # not the mean of 2/3 and 1
    assert got["mmmu/art_and_design/accuracy"] == pytest.approx(0.0)
    assert got["mmmu/overall/accuracy"] == pytest.approx(100 * 3 / 5)
    assert got["mmmu/questions"] == 5
    assert got["mmmu/random_fallbacks"] == 0
    assert list(got)[0] == "mmmu/overall/accuracy"  # the headline first
    assert "mmmu/business/accuracy" not in got  # only disciplines that were run
    assert scores.details["multi_image_questions"] == 1
    assert scores.details["per_question"]["validation_Math_2"] == {"correct": True, "parsed": "B", "how": "bracket"}


# ---- MMMU: the parquet reader --------------------------------------------------------------

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.string()),
                    ("explanation", pa.string()), *[(f"image_{i}", IMAGE) for i in range(1, 8)],
                    ("img_type", pa.string()), ("answer", pa.string()), ("topic_difficulty", pa.string()),
                    ("question_type", pa.string()), ("subfield", pa.string())])

RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 200, 30)


def _mmmu_row(qid, question, options, answer, kind="multiple-choice", images=(RED,)):
    row = {"id": qid, "question": question, "options": repr(options), "explanation": "", "img_type": "['Photos']",
           "answer": answer, "topic_difficulty": "Easy", "question_type": kind, "subfield": "x"}
    for i in range(1, 8):
        color = images[i - 1] if i <= len(images) else None
        row[f"image_{i}"] = {"bytes": _png_bytes(color), "path": f"{qid}_{i}.png"} if color else None
    return row


def _write_parquet(path: Path, rows, schema=SCHEMA):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def make_mmmu(root: Path) -> Path:
    """Two subjects, four questions: Art (one with two images), Math (one open, with a list
    of accepted answers). Returns the file of Art's validation split."""
    art = root / "MMMU" / "Art" / "validation-00000-of-00001.parquet"
    _write_parquet(art, [
        _mmmu_row("validation_Art_1", "<image 1> Which colour dominates?", ["blue", "red", "green"], "B"),
        _mmmu_row("validation_Art_2", "Is <image 1> or <image 2> older?", ["<image 1>", "<image 2>"], "A",
                  images=(BLUE, GREEN)),
    ])
    _write_parquet(root / "MMMU" / "Math" / "validation-00000-of-00001.parquet", [
        _mmmu_row("validation_Math_1", "<image 1> What is x?", [], "['12.5', '25/2']", kind="open"),
        _mmmu_row("validation_Math_2", "Which is prime?", ["4", "7"], "B"),
    ])
    _write_parquet(root / "MMMU" / "Math" / "dev-00000-of-00001.parquet", [
        _mmmu_row("dev_Math_1", "Dev question?", ["a", "b"], "A")])
    (root / "MMMU" / "README.md").write_text("not a subject\n")
    return art


def test_mmmu_reader_reads_the_hub_layout(tmp_path):
    make_mmmu(tmp_path)
    questions = readers.read_mmmu(tmp_path)  # the folder holding MMMU/, or MMMU/ itself
    assert [q.id for q in questions] == [q.id for q in readers.read_mmmu(tmp_path / "MMMU")]
    assert [(q.id, q.group) for q in questions] == [("validation_Art_1", "Art"), ("validation_Art_2", "Art"),
                                                    ("validation_Math_1", "Math"), ("validation_Math_2", "Math")]
    art1, art2, math1, _ = questions
    assert art1.prompt == f"<image 1> Which colour dominates?\nA. blue\nB. red\nC. green\n\n{CHOICE}"
    assert math1.prompt == f"<image 1> What is x?\n\n{SHORT_ANSWER}"
    assert art1.truth == {"question_type": "multiple-choice", "answer": "B", "options": ["blue", "red", "green"],
                          "images": 1}
    assert math1.truth["answer"] == ["12.5", "25/2"]  # a Python-literal list of accepted answers
    # Two images: the model is shown image_1 (blue), the count says there were two.
    assert art2.truth["images"] == 2 and Image.open(io.BytesIO(art2.image)).convert("RGB").getpixel((0, 0)) == BLUE
    assert art2.image_name == "Art/validation_Art_2/image_1"
    # The encoded bytes are what both predictors take (the checkpoint and the runtime decode
    # every image with preprocess.load_image).
    from ftz_edge.preprocess import load_image

    assert load_image(art2.image).size == (12, 10)
    mmmu_repo = readers.read_mmmu(tmp_path, prompt_style="mmmu")
    assert mmmu_repo[0].prompt == f"<image 1> Which colour dominates?\n(A) blue\n(B) red\n(C) green\n\n{CHOICE}"
    assert mmmu_repo[2].prompt == f"<image 1> What is x?\n{SHORT_ANSWER}"
    assert [q.id for q in readers.read_mmmu(tmp_path, limit=1)] == ["validation_Art_1", "validation_Math_1"]


def test_mmmu_reader_dev_split(tmp_path):
    make_mmmu(tmp_path)  # Math has a dev file, Art has not
    with pytest.raises(EvalDataError, match=r"Art: no dev-\*.parquet file in it"):
        readers.read_mmmu(tmp_path, split="dev")
    (tmp_path / "MMMU" / "Art" / "validation-00000-of-00001.parquet").rename(
        tmp_path / "MMMU" / "Art" / "dev-00000-of-00001.parquet")
    assert [q.id for q in readers.read_mmmu(tmp_path, split="dev")] == ["validation_Art_1", "validation_Art_2",
                                                                       "dev_Math_1"]


def test_mmmu_reader_errors(tmp_path):
    art = make_mmmu(tmp_path)
    with pytest.raises(EvalDataError, match="split must be one of validation, dev, got 'test' .*not public"):
        readers.read_mmmu(tmp_path, split="test")
    with pytest.raises(EvalDataError, match="no MMMU subject folders"):
        readers.read_mmmu(tmp_path / "MMMU" / "Art")

    def broken(**changes):
        row = {**_mmmu_row("validation_Art_9", "Q?", ["a", "b"], "A"), **changes}
        _write_parquet(art, [row])
        return f"{art}: row 0 \\(validation_Art_9\\): "

    where = broken(answer="E")
    with pytest.raises(EvalDataError, match=where + "answer 'E' is not one of the option letters AB"):
        readers.read_mmmu(tmp_path)
    where = broken(options="['a', 'b'")
    with pytest.raises(EvalDataError, match=where + "options is not a Python list literal"):
        readers.read_mmmu(tmp_path)
    where = broken(question_type="essay")
    with pytest.raises(EvalDataError, match=where + "question_type must be"):
        readers.read_mmmu(tmp_path)
    where = broken(image_1=None)
    with pytest.raises(EvalDataError, match=where + "image_1 is empty"):
        readers.read_mmmu(tmp_path)
    where = broken(image_2={"bytes": b"not a png", "path": "x.png"})
    with pytest.raises(EvalDataError, match=where + "image_2 is not an image Pillow can read"):
        readers.read_mmmu(tmp_path)
    _write_parquet(art, [{"id": "x", "question": "q"}], pa.schema([("id", pa.string()), ("question", pa.string())]))
    with pytest.raises(EvalDataError, match=f"{art}: missing columns 'options', 'answer', 'question_type'"):
        readers.read_mmmu(tmp_path)
    art.write_bytes(b"PAR1 this is no parquet file")
    with pytest.raises(EvalDataError, match=f"{art}: not a readable parquet file"):
        readers.read_mmmu(tmp_path)


# ---- MM-Vet: reader, the grader's protocol, its scores ------------------------------------

MMVET = {
    "v1_0": {"imagename": "v1_0.png", "capability": ["rec"], "question": "What colour is it?", "answer": "red"},
    "v1_1": {"imagename": "v1_1.png", "capability": ["ocr", "rec"], "question": "What does it say?",
             "answer": "stop<OR>halt"},
    "v1_2": {"imagename": "v1_2.png", "capability": ["ocr"], "question": "Which word?", "answer": "go"},
    "v1_3": {"imagename": "v1_2.png", "capability": ["math", "ocr"], "question": "What is x?",
             "answer": "-1<AND>-5"},
}


def make_mmvet(root: Path) -> dict:
    (root / "images").mkdir(parents=True)
    for name in ("v1_0.png", "v1_1.png", "v1_2.png"):
        Image.new("RGB", (8, 8), RED).save(root / "images" / name)
    (root / "mm-vet.json").write_text(json.dumps(MMVET, indent=2))
    return MMVET


def test_mmvet_reader(tmp_path):
    make_mmvet(tmp_path / "mm-vet")
    questions = readers.read_mmvet(tmp_path)  # the folder, or the one holding mm-vet/
    assert [(q.id, q.group, q.prompt) for q in questions] == [
        ("v1_0", "rec", "What colour is it?"), ("v1_1", "ocr_rec", "What does it say?"),
        ("v1_2", "ocr", "Which word?"), ("v1_3", "math_ocr", "What is x?")]  # the question alone, as LLaVA asks it
    assert questions[1].truth == {"answer": "stop<OR>halt", "capability": ["ocr", "rec"]}
    assert questions[0].image == tmp_path / "mm-vet" / "images" / "v1_0.png"
    assert len(readers.read_mmvet(tmp_path / "mm-vet", limit=2)) == 2


def test_mmvet_reader_errors(tmp_path):
    make_mmvet(tmp_path)
    path = tmp_path / "mm-vet.json"
    path.write_text(json.dumps({"v1_0": {**MMVET["v1_0"], "imagename": "gone.png"}}))
    with pytest.raises(EvalDataError, match=f"{path}: v1_0: image .*gone.png does not exist"):
        readers.read_mmvet(tmp_path)
    path.write_text(json.dumps({"v1_0": {"imagename": "v1_0.png", "question": "?"}}))
    with pytest.raises(EvalDataError, match=f"{path}: v1_0: missing fields 'capability', 'answer'"):
        readers.read_mmvet(tmp_path)
    path.write_text(json.dumps({"v1_0": {**MMVET["v1_0"], "capability": "rec"}}))
    with pytest.raises(EvalDataError, match="'capability' must be a non-empty list of strings"):
        readers.read_mmvet(tmp_path)
    path.write_text("{")
    with pytest.raises(EvalDataError, match=f"{path}: not valid JSON"):
        readers.read_mmvet(tmp_path)
    with pytest.raises(EvalDataError, match="no mm-vet.json in it"):
        readers.read_mmvet(tmp_path / "images")


def test_mmvet_grader_query_is_the_official_prompt_plus_the_row():
    query = metrics.mmvet_grader_query("What is x?", "-1<AND>-5", "x = -1")
    assert query.startswith("Compare the ground truth and prediction from AI models, to give a correctness score")
    assert query.endswith("physical characteristics. | 1.0\n\nWhat is x? | -1 <AND> -5 | x = -1 | ")
    retry = metrics.mmvet_grader_query("What is x?", "-1<AND>-5", "x = -1", retry=True)
    assert retry == query + "\nPredict the correctness of the answer (digit): "


@pytest.mark.parametrize("reply, grade", [
    ("0.5", 0.5), ("1.0", 1.0), ("0", 0.0), ("0.7 because", 0.7), ("0.4\n", 0.4),
    (" 0.5", None),  # the evaluator reads the text before the first space: "" here
    ("1.2", None), ("-0.1", None), ("nan", None), ("Correct", None), ("", None), (None, None),
])
def test_mmvet_grade_parsing(reply, grade):
    assert metrics.mmvet_parse_grade(reply) == grade


def test_mmvet_scores_per_capability_and_total():
    items = [(["rec"], 1.0), (["rec", "ocr"], 0.5), (["ocr"], 0.0), (["math", "ocr"], 0.4)]
    result = metrics.mmvet_scores(items)
    caps = {c: b["score"] for c, b in result["capabilities"].items()}
    assert list(caps) == ["rec", "ocr", "math"]  # MM-Vet's table order
    assert caps["rec"] == pytest.approx(100 * (1.0 + 0.5) / 2)
    assert caps["ocr"] == pytest.approx(100 * (0.5 + 0.0 + 0.4) / 3)
    assert caps["math"] == pytest.approx(100 * 0.4)
    assert result["total"] == {"score": pytest.approx(100 * 1.9 / 4), "questions": 4}
    assert {k: b["score"] for k, b in result["integrations"].items()} == pytest.approx(
        {"rec": 100.0, "ocr_rec": 50.0, "ocr": 0.0, "math_ocr": 40.0})


def test_mmvet_is_not_scored_without_grades():
    entries = [{"id": "v1_0", "group": "rec", "prediction": "red", "answer": "red", "capability": ["rec"]}]
    scores = scoring.score("mmvet", entries)
    assert scores.metrics == {"mmvet/questions": 1, "mmvet/graded": 0}
    assert scores.details["note"].startswith("not scored: 0 of 1 answers graded")
    partly = scoring.score("mmvet", entries + [{**entries[0], "id": "v1_1", "grade": 1.0, "grader_model": "g"}])
    assert "mmvet/total" not in partly.metrics and partly.metrics["mmvet/graded"] == 1


# ---- MM-Vet: the grader against a local fake OpenAI-compatible server ----------------------


class FakeGrader:
    """A chat-completions endpoint on 127.0.0.1: replies come from ``script`` (a list of
    (status, content) consumed in order, then ``default``); every request is recorded."""

    def __init__(self):
        self.requests, self.headers, self.script = [], [], []
        self.default = lambda body: (200, "1.0")
        grader = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                grader.requests.append(body)
                grader.headers.append({k.lower(): v for k, v in self.headers.items()})
                status, content = grader.script.pop(0) if grader.script else grader.default(body)
                if self.path != "/v1/chat/completions":
                    status, content = 404, "no such route"
                if status == 200:
                    payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"] + "-served",
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": content}}]}
                else:
                    payload = {"error": {"message": content, "type": "fake", "code": status}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_grader(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    grader = FakeGrader()
    yield grader
    grader.close()


def _transports():
    try:
        import openai  # noqa: F401

        return [False, True]
    except ImportError:
        return [False]


@pytest.mark.parametrize("use_openai", _transports(), ids=lambda v: "openai" if v else "urllib")
def test_grader_sends_the_official_request_and_parses_the_reply(fake_grader, monkeypatch, use_openai):
    monkeypatch.setenv("FAKE_GRADER_KEY", "secret")
    client = ChatClient(GraderConfig(fake_grader.url, model="judge", key_env="FAKE_GRADER_KEY",
                                     use_openai=use_openai, backoff_s=0))
    assert client.transport == ("openai" if use_openai else "urllib")
    fake_grader.script = [(200, "0.6")]
    result = grade_answer(client, "What is x?", "-1<AND>-5", "x = -1")
    assert result == {"grade": 0.6, "reply": "0.6", "model": "judge-served", "attempts": 1}
    (request,) = fake_grader.requests
    assert request["model"] == "judge" and request["max_tokens"] == 3 and request["temperature"] == 0.0
    assert request["messages"] == [{"role": "user",
                                    "content": metrics.mmvet_grader_query("What is x?", "-1<AND>-5", "x = -1")}]
    assert fake_grader.headers[0]["authorization"] == "Bearer secret"


@pytest.mark.parametrize("use_openai", _transports(), ids=lambda v: "openai" if v else "urllib")
def test_grader_retries_unparsable_replies_on_the_evaluators_schedule(fake_grader, use_openai):
    client = ChatClient(GraderConfig(fake_grader.url, use_openai=use_openai, backoff_s=0))
    fake_grader.script = [(200, "Correct"), (200, " 0.5"), (200, "0.8")]
    assert grade_answer(client, "Q", "A", "P")["grade"] == 0.8
    temps = [r["temperature"] for r in fake_grader.requests]
    assert temps == [0.0, 0.0, 0.5]
    retry_line = "\nPredict the correctness of the answer (digit): "
    assert [r["messages"][0]["content"].endswith(retry_line) for r in fake_grader.requests] == [False, True, True]
    # Five unparsable replies: the grade is 0.0, after the temperatures 0, 0, 0.5, 1.0, 1.5.
    fake_grader.requests.clear()
    fake_grader.default = lambda body: (200, "great answer")
    assert grade_answer(client, "Q", "A", "P") == {"grade": 0.0, "reply": "great answer", "model": "gpt-4-0613-served",
                                                   "attempts": 5}
    assert [r["temperature"] for r in fake_grader.requests] == [0.0, 0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize("use_openai", _transports(), ids=lambda v: "openai" if v else "urllib")
def test_grader_transport_errors(fake_grader, monkeypatch, use_openai):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    pauses = []
    client = ChatClient(GraderConfig(fake_grader.url, use_openai=use_openai, retries=3, backoff_s=0.5),
                        sleep=pauses.append)
    fake_grader.script = [(503, "overloaded"), (429, "slow down"), (200, "1.0")]
    assert grade_answer(client, "Q", "A", "P")["grade"] == 1.0
    assert pauses == [0.5, 1.0]  # a doubling pause between tries
    # No key set: urllib sends none; the openai client insists on one and gets the placeholder "none".
    assert fake_grader.headers[0].get("authorization") == ("Bearer none" if use_openai else None)
    fake_grader.script = [(401, "invalid api key")]
    with pytest.raises(GraderError, match=r"HTTP 401.*invalid api key.*\$OPENAI_API_KEY, which is unset"):
        grade_answer(client, "Q", "A", "P")
    fake_grader.default = lambda body: (500, "down")
    with pytest.raises(GraderError, match="failed 4 times"):
        grade_answer(client, "Q", "A", "P")


def test_grader_unreachable_and_bad_url():
    client = ChatClient(GraderConfig("http://127.0.0.1:9/v1", use_openai=False, retries=1, backoff_s=0))
    with pytest.raises(GraderError, match="failed 2 times"):
        grade_answer(client, "Q", "A", "P")
    with pytest.raises(GraderError, match="must be an http:// or https:// URL"):
        ChatClient(GraderConfig("api.openai.com"))
    assert GraderConfig("http://h/v1/chat/completions/").base_url == "http://h/v1"


def test_grade_entries_names_the_question_that_failed(fake_grader):
    client = ChatClient(GraderConfig(fake_grader.url, use_openai=False, retries=0, backoff_s=0))
    entries = [{"id": "v1_0", "prompt": "Q0", "answer": "a", "prediction": "a"},
               {"id": "v1_1", "prompt": "Q1", "answer": "b", "prediction": "c"}]
    fake_grader.script = [(200, "1.0"), (400, "bad request")]
    with pytest.raises(GraderError, match="MM-Vet question v1_1: .*HTTP 400"):
        grade_entries(entries, client)
    assert entries[0]["grade"] == 1.0 and "grade" not in entries[1]


# ---- the CLI end to end, with a fake predictor ----------------------------------------------

def _fake_predictor(seen):
    """Answers without a model: MMMU multiple choice "(B)", open "12.5"; MM-Vet the ground
    truth's first word for v1_0 / v1_1 and "no idea" otherwise. Records each image it is shown."""
    def predict(image, prompt, max_new_tokens):
        seen.append((prompt, image, max_new_tokens))
        if prompt.endswith(CHOICE):
            return "(B)"
        if prompt.endswith(SHORT_ANSWER):
            return "12.5"
        return {"What colour is it?": "red", "What does it say?": "It says stop"}.get(prompt, "no idea")
    return predict


@pytest.fixture
def benchmarks(tmp_path, monkeypatch):
    make_mmmu(tmp_path / "mmmu")
    make_mmvet(tmp_path / "mm-vet")
    seen = []
    monkeypatch.setattr(cli, "load_predictor", lambda *args, **kwargs: _fake_predictor(seen))
    return tmp_path, seen


def _argv(tmp_path, *extra):
    return ["--model", f"default={ftz_edge.DEFAULT_MODEL}", "--mmmu", str(tmp_path / "mmmu"),
            "--mmvet", str(tmp_path / "mm-vet"), "--out", str(tmp_path / "out"), "--no-progress", *extra]


def test_cli_mmmu_and_mmvet_without_a_grader(benchmarks, capsys):
    tmp_path, seen = benchmarks
    assert cli.main(_argv(tmp_path)) == 0
    out = tmp_path / "out"
    report = json.loads((out / "eval.json").read_text())
    mmmu = report["results"]["default"]["mmmu"]["metrics"]
    # "(B)" everywhere: Art_1 (B) right, Art_2 (A) wrong; Math_1 open "12.5" right, Math_2 (B) right.
    assert mmmu["mmmu/Art/accuracy"] == pytest.approx(50.0)
    assert mmmu["mmmu/art_and_design/accuracy"] == pytest.approx(50.0)
    assert mmmu["mmmu/Math/accuracy"] == pytest.approx(100.0)
    assert mmmu["mmmu/science/accuracy"] == pytest.approx(100.0)
    assert mmmu["mmmu/overall/accuracy"] == pytest.approx(75.0)
    assert mmmu["mmmu/questions"] == 4
    # The model saw image_1 of the two-image question, at MMMU's max_new_tokens.
    two_images = next((image, tokens) for prompt, image, tokens in seen if "older" in prompt)
    assert Image.open(io.BytesIO(two_images[0])).convert("RGB").getpixel((0, 0)) == BLUE and two_images[1] == 16
    # MM-Vet: no score, the official submission file, and the report says so.
    mmvet = report["results"]["default"]["mmvet"]
    assert mmvet["metrics"] == {"mmvet/questions": 4, "mmvet/graded": 0}
    submission = json.loads(Path(mmvet["submission"]).read_text())
    assert submission == {"v1_0": "red", "v1_1": "It says stop", "v1_2": "no idea", "v1_3": "no idea"}
    assert Path(mmvet["submission"]) == out / "mmvet-default.json"
    assert report["benchmarks"]["mmvet"]["max_new_tokens"] == 1024
    markdown = (out / "eval.md").read_text()
    assert "default / mmvet: not scored: 0 of 4 answers graded" in markdown
    assert "| mmmu/overall/accuracy (%) | 75.00 |" in markdown
    assert "mmvet/total" not in markdown
    captured = capsys.readouterr()
    assert "no --grader-url, so no MM-Vet score" in captured.err
    assert "| mmvet/graded | 0 |" in captured.out


def test_cli_mmvet_with_a_grader(benchmarks, fake_grader, capsys):
    tmp_path, _ = benchmarks

    def grade(body):  # 1.0 when the prediction holds the ground truth's first word, else 0.0
        row = body["messages"][0]["content"].rsplit("\n", 1)[-1].split(" | ")
        truth, prediction = row[1].split(" <")[0], row[2]
        return 200, "1.0" if truth.lower() in prediction.lower() else "0.0"

    fake_grader.default = grade
    argv = _argv(tmp_path, "--grader-url", fake_grader.url, "--grader-model", "judge")
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    mmvet = report["results"]["default"]["mmvet"]
    # v1_0 (rec) 1.0, v1_1 (ocr, rec) 1.0, v1_2 (ocr) 0.0, v1_3 (math, ocr) 0.0.
    assert mmvet["metrics"]["mmvet/total"] == pytest.approx(50.0)
    assert mmvet["metrics"]["mmvet/rec"] == pytest.approx(100.0)
    assert mmvet["metrics"]["mmvet/ocr"] == pytest.approx(100 / 3)
    assert mmvet["metrics"]["mmvet/math"] == pytest.approx(0.0)
    assert mmvet["metrics"]["mmvet/graded"] == 4
    assert [e["grade"] for e in mmvet["predictions"]] == [1.0, 1.0, 0.0, 0.0]
    assert mmvet["details"]["grader_models"] == ["judge-served"]
    assert report["benchmarks"]["mmvet"]["source"]["grader_model"] == "judge"
    # Recomputed from the saved entries alone.
    assert scoring.score("mmvet", mmvet["predictions"]).metrics == mmvet["metrics"]
    assert "graded by judge-served" in (tmp_path / "out" / "eval.md").read_text()
    assert (tmp_path / "out" / "mmvet-default.json").is_file()


def test_cli_grader_failure_keeps_the_answers_and_fails(benchmarks, fake_grader, capsys, monkeypatch):
    tmp_path, _ = benchmarks
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake_grader.default = lambda body: (401, "invalid api key")
    assert cli.main(_argv(tmp_path, "--grader-url", fake_grader.url)) == 2
    err = capsys.readouterr().err
    assert "ftz-eval: error: default: MM-Vet question v1_0: grader" in err and "HTTP 401" in err
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert "mmvet/total" not in report["results"]["default"]["mmvet"]["metrics"]
    assert (tmp_path / "out" / "mmvet-default.json").is_file()


def test_cli_bad_files_give_one_error_line(benchmarks, capsys):
    tmp_path, seen = benchmarks
    art = tmp_path / "mmmu" / "MMMU" / "Art" / "validation-00000-of-00001.parquet"
    art.write_bytes(b"garbage")
    assert cli.main(_argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ftz-eval: error: {art}: not a readable parquet file") and err.count("\n") == 1
    assert not seen and not (tmp_path / "out").exists()  # nothing answered, nothing written
    make_mmmu(tmp_path / "mmmu")
    (tmp_path / "mm-vet" / "mm-vet.json").write_text("[]")
    assert cli.main(_argv(tmp_path)) == 2
    assert "mm-vet.json: expected an object of question id -> question" in capsys.readouterr().err
    make_mmvet(tmp_path / "mm-vet2")
    argv = _argv(tmp_path, "--grader-url", "localhost:8000")
    argv[argv.index(str(tmp_path / "mm-vet"))] = str(tmp_path / "mm-vet2")
    assert cli.main(argv) == 2
    assert "--grader-url must be an http:// or https:// URL" in capsys.readouterr().err
    assert not seen
