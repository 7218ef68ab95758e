"""Rewards, the <think> gate, and the prompt sources (keel.rl.rewards, keel.rl.prompts, keel.rl.long_context),
on hand examples, real reasoning-gym items and the real KJV text."""
import json
import re

import pytest

from keel.errors import ConfigError, DataError
from keel.rl.prompts import PromptItem, load_prompts
from keel.rl.rewards import get_reward
from keel.rl.rewards.math import extract_final_answer, math_reward


def item(answer, reward, think_gate=False):
    return PromptItem(prompt="q", task="t", answer=answer, reward=reward, source="test", meta={"think_gate": think_gate})


def score(reward, response, answer, think_gate=False):
    return get_reward(reward)(response, item(answer, reward, think_gate))


# ----------------------------------------------------------------------------------------- math

@pytest.mark.parametrize("response, gold, expected", [
    ("so the result is \\boxed{\\frac{3}{4}}", "0.75", 1.0),                 # LaTeX fraction vs decimal
    ("\\boxed{3/4}", "\\dfrac{3}{4}", 1.0),
    ("The answer is -12.", "-12", 1.0),                                     # negative, trailing period
    ("First 3, then 7, finally 1,000", "1000", 1.0),                       # last number, thousands comma
    ("\\boxed{2\\sqrt{2}}", "sqrt(8)", 1.0),                               # symbolic equal forms
    ("Answer: x^2 + 2x + 1", "(x+1)^2", 1.0),
    ("The answer is $x = 5$.", "5", 1.0),
    ("answer is pi/2", "1.5707963267949", 1.0),                            # numeric tolerance
    ("\\boxed{\\frac{1}{3}}", "0.333", 0.0),                               # beyond tolerance
    ("The answer is 42", "43", 0.0),                                       # wrong
    ("Answer: x^2 + 1", "(x+1)^2", 0.0),                                   # wrong symbolic
    ("answer is 9**99999", "1", 0.0),                                      # refused, not evaluated
    ("no numbers here", "1", 0.0),
])
def test_math_verifier(response, gold, expected):
    assert math_reward(response, gold) == expected
    assert score("math", response, gold) == expected


def test_math_extraction_prefers_last_boxed():
    assert extract_final_answer("\\boxed{1} then \\boxed{\\frac{1}{2}} and 7") == "\\frac{1}{2}"
    assert extract_final_answer("The answer is 3. Wait, 12 and 14") == "3"
    assert extract_final_answer("5 apples and -7 pears") == "-7"


# --------------------------------------------------------------------------------- GoLongRL metrics

def test_metrics_on_hand_examples():
    assert score("em", "reasoning...\nAnswer: gen.", "Gen") == 1.0
    assert score("em", "Answer: Genesis", "Gen") == 0.0
    assert score("accuracy", "Answer: b\nbecause", ["B"]) == 1.0
    assert score("accuracy", "Answer: c", ["B"]) == 0.0
    # SubEM: 2 of 3 gold items among the predicted lines
    assert score("subem", "[Answer]\nb\nx\na", ["a", "b", "c"]) == pytest.approx(2 / 3)
    # set F1: P = 2/4, R = 2/3 -> 4/7
    assert score("f1", "[Answer]\na\nb\nd\ne", ["a", "b", "c"]) == pytest.approx(4 / 7)
    # ROUGE-L: LCS("the cat sat on the mat", "the cat lay on mat") = 4 -> P 4/5, R 4/6 -> F 8/11
    assert score("rouge_l", "Answer: The cat lay on mat", "the cat sat on the mat") == pytest.approx(8 / 11)
    # NDCG@3, gold a>b>c (rel 3,2,1), predicted b,a,d: (2/log2 2 + 3/log2 3) / (3 + 2/log2 3 + 1/2)
    import math
    expected = (2 + 3 / math.log2(3)) / (3 + 2 / math.log2(3) + 0.5)
    assert score("ndcg", "[Answer]\nb\na\nd", ["a", "b", "c"]) == pytest.approx(expected)
    assert score("ndcg", "[Answer]\na\nb\nc", ["a", "b", "c"]) == pytest.approx(1.0)
    # pairwise: predicted b,a,c (3 predicted pairs); gold pairs present: (a,b) wrong, (a,c), (b,c) right
    assert score("pairwise_accuracy", "[Answer]\nb\na\nc", ["a", "b", "c", "d"]) == pytest.approx(2 / 3)
    assert score("pairwise_accuracy", "Answer: B\nA", ["B", "A"]) == 1.0
    assert score("pairwise_accuracy", "Answer: A\nB", ["B", "A"]) == 0.0
    # IoU: {a,b,c} vs {b,c,d,e} -> 2/5
    assert score("iou", "[Answer]\nb\nc\nd\ne", ["a", "b", "c"]) == pytest.approx(0.4)


def test_think_gate():
    good = "<think>the verse is in Gen</think>\nAnswer: Gen"
    assert score("em", good, "Gen", think_gate=True) == 1.0
    assert score("em", "the verse is in Gen\nAnswer: Gen", "Gen", think_gate=True) == 0.0  # no </think>
    assert score("em", "<think>a</think><think>b</think>Answer: Gen", "Gen", think_gate=True) == 0.0
    assert score("em", "<think>a</think>b</think>Answer: Gen", "Gen", think_gate=True) == 0.0
    assert score("math", "thinking</think> \\boxed{4}", "4", think_gate=True) == 1.0  # <think> opened by the template
    # gate off: no format needed, but an answer given only while thinking does not count
    assert score("em", "Answer: Gen", "Gen") == 1.0
    assert score("em", "<think>Answer: Gen</think> Answer: Exo", "Gen") == 0.0


def test_unknown_reward_name():
    with pytest.raises(ConfigError, match=r"unknown reward 'rouge-l' \(did you mean 'rouge_l'\?\)"):
        get_reward("rouge-l")


# ------------------------------------------------------------------------------------ reasoning-gym

@pytest.mark.parametrize("dataset", ["basic_arithmetic", "chain_sum"])
def test_reasoning_gym_reward_agrees_with_score_answer(dataset):
    import reasoning_gym
    items = load_prompts({"source": "reasoning_gym", "name": dataset, "size": 12, "seed": 3})
    direct = reasoning_gym.create_dataset(dataset, size=12, seed=3)
    assert len(items) == 12
    reward = get_reward("reasoning_gym")
    seen = set()
    for it, entry in zip(items, direct):
        assert it.meta["question"] == entry["question"] and it.answer == entry["answer"]
        assert it.prompt.endswith(entry["question"]) and "<answer>" in it.prompt  # reasoning-gym's instruction
        wrong = str(int(entry["answer"]) + 1)
        for response, extracted in [(f"Let me compute.\n<answer>{entry['answer']}</answer>", entry["answer"]),
                                    (f"<answer>{wrong}</answer>", wrong),
                                    (f"<answer>{entry['answer']}0</answer>", entry["answer"] + "0"),
                                    (f"So the answer is {entry['answer']}.", entry["answer"]),
                                    ("I do not know.", None)]:
            got = reward(response, it)
            assert got == direct.score_answer(extracted, entry)
            seen.add(got)
    assert {0.0, 1.0} <= seen


def test_reasoning_gym_bad_dataset():
    with pytest.raises(ConfigError, match=r"rl.prompts.name: .*'basic_arithmetc' \(did you mean 'basic_arithmetic'\?\)"):
        load_prompts({"source": "reasoning_gym", "name": "basic_arithmetc"})
    with pytest.raises(ConfigError, match=r"rl.prompts.name: required"):
        load_prompts({"source": "reasoning_gym"})


# ------------------------------------------------------------------------------------- long context

def _document_blocks(prompt: str) -> dict:
    """Document name -> [(line number, text)], parsed back out of the prompt."""
    blocks = {}
    for block in re.findall(r"Document \d+: (\S+)\n(.*?)(?=\n\nDocument \d+: |\n\nQuestion: )", prompt, re.S):
        name, body = block
        blocks[name] = [(int(m.group(1)), m.group(2)) for m in
                        (re.match(rf"\[{re.escape(name)} (\d+)\] (.*)", line) for line in body.split("\n"))]
    return blocks


def _recount(text: str, word: str) -> int:
    letters_only = "".join(ch.lower() if ch.isascii() and ch.isalpha() else " " for ch in text)
    return letters_only.split().count(word)


def test_long_context_answers_are_correct_on_kjv():
    from keel.data.assets import corpus_files
    kjv = {p.stem.split("_", 1)[1]: [ln for ln in (" ".join(x.split()) for x in p.read_text().splitlines()) if ln]
           for p in corpus_files("kjv")}
    cfg = {"source": "long_context", "corpus": "kjv", "n": 16, "seed": 5, "context_tokens": 1500, "n_docs": 3}
    items = load_prompts(cfg)
    assert [it.task for it in items[:4]] == ["long_retrieval", "long_quote_source", "long_counting", "long_ordering"]
    for it in items:
        blocks = _document_blocks(it.prompt)
        assert list(blocks) == it.meta["documents"]
        for name, lines in blocks.items():  # every labelled line is that line of the real book
            assert all(kjv[name][n - 1] == text for n, text in lines)
        if it.task == "long_retrieval":
            name, n = re.fullmatch(r"\[(\S+) (\d+)\]", it.meta["label"]).groups()
            assert it.answer == kjv[name][int(n) - 1]
        elif it.task == "long_quote_source":
            holders = [name for name, lines in blocks.items()
                       if it.meta["quote"].lower() in " ".join(t for _, t in lines).lower()]
            assert holders == [it.answer]
        elif it.task == "long_counting":
            name = it.meta["documents"][it.meta["document"] - 1]
            recount = _recount(" ".join(t for _, t in blocks[name]), it.meta["word"])
            assert int(it.answer) == recount and recount >= 1
        else:
            context = it.prompt.split("\n\nQuestion: ")[0] + "\n"
            order = sorted(it.meta["lines"], key=lambda label: context.find("] " + it.meta["lines"][label] + "\n"))
            assert it.answer == order
        # the gold answer, written as asked, earns full reward
        written = "\n".join(it.answer) if isinstance(it.answer, list) else it.answer
        assert get_reward(it.reward)(f"Some thoughts.\nAnswer: {written}", it) == 1.0
    # deterministic in the seed
    again = load_prompts(cfg)
    assert [a.prompt for a in again] == [b.prompt for b in items]
    assert load_prompts({**cfg, "seed": 6})[0].prompt != items[0].prompt


def test_long_context_token_budget_with_real_tokenizer():
    from transformers import AutoTokenizer
    from keel.data.assets import asset_path
    tokenizer = AutoTokenizer.from_pretrained(asset_path("smollm2"))
    items = load_prompts({"source": "long_context", "corpus": "both", "n": 4, "seed": 1,
                          "context_tokens": 3000, "tokenizer": tokenizer})
    for it in items:
        n = len(tokenizer.encode(it.prompt))
        assert n == it.meta["prompt_tokens"] and 0.8 * 3000 <= n <= 3000


def test_long_context_bad_options():
    with pytest.raises(ConfigError, match=r"rl.prompts.tasks: unknown long-context task 'sorting'"):
        load_prompts({"source": "long_context", "tasks": ["sorting"]})
    with pytest.raises(ConfigError, match=r"rl.prompts.n_doc: .*did you mean 'n_docs'"):
        load_prompts({"source": "long_context", "n_doc": 2})


# -------------------------------------------------------------------------------------------- jsonl

def test_jsonl_source_and_errors(tmp_path):
    good = tmp_path / "prompts.jsonl"
    good.write_text(json.dumps({"prompt": "What is 2+2?", "answer": "4"}) + "\n\n"
                    + json.dumps({"prompt": "Say Gen", "answer": "Gen", "reward": "em", "task": "qa",
                                  "meta": {"think_gate": True}}) + "\n")
    items = load_prompts({"source": "jsonl", "path": str(good), "reward": "math"})
    assert [(i.reward, i.task, i.source) for i in items] == [("math", "jsonl", "prompts"), ("em", "qa", "prompts")]
    assert get_reward(items[0].reward)("2+2 = \\boxed{4}", items[0]) == 1.0
    assert get_reward(items[1].reward)("Answer: Gen", items[1]) == 0.0  # this line asks for the think gate

    def error_for(text, **opts):
        path = tmp_path / "bad.jsonl"
        path.write_text(text)
        with pytest.raises(DataError) as exc:
            load_prompts({"source": "jsonl", "path": str(path), **opts})
        message = str(exc.value)
        assert "\n" not in message
        return message

    ok = json.dumps({"prompt": "p", "answer": "a"})
    assert error_for(f"{ok}\n{ok}\n{{\"prompt\": \"p\", \n", reward="em").startswith(f"{tmp_path}/bad.jsonl:3: not valid JSON")
    assert error_for(f"{ok}\n{json.dumps({'prompt': 'p'})}\n", reward="em") == \
        f"{tmp_path}/bad.jsonl:2: missing required field 'answer'"
    assert error_for("[1, 2]\n", reward="em") == f"{tmp_path}/bad.jsonl:1: expected a JSON object, got list"
    assert "bad.jsonl:1: missing field 'reward'" in error_for(f"{ok}\n")
    assert "bad.jsonl:1: unknown reward 'rouge' (did you mean 'rouge_l'?)" in error_for(
        json.dumps({"prompt": "p", "answer": "a", "reward": "rouge"}) + "\n")
    with pytest.raises(DataError, match="missing.jsonl: prompt file not found"):
        load_prompts({"source": "jsonl", "path": str(tmp_path / "missing.jsonl"), "reward": "em"})
    with pytest.raises(ConfigError, match=r"rl.prompts.source: unknown prompt source 'json' \(did you mean 'jsonl'\?\)"):
        load_prompts({"source": "json", "path": str(good)})
