"""Rewards for GRPO training and the MMAU answer scorer.

R1-AQA scores each sampled completion with two rule-based rewards and adds them:
  - accuracy: the text inside the first <answer>...</answer> (or the whole completion if there
    is none), stripped, must equal the correct choice string exactly. Case counts.
  - format: the whole completion must be one <answer>...</answer> block (in the think variant,
    <think>...</think> then <answer>...</answer>). Nothing may come before or after it. The direct
    prompt (the paper's Prompt <1>) asks for the bare answer: one line, no tags, nothing around it.
With both weights at 1, a completion scores 0, 1 or 2. No learned reward model is involved.

One difference from R1-AQA's code, on purpose: its accuracy reward first asks math_verify whether
completion and solution parse to the same math expression, and compares strings only if not.
math_verify pulls numbers out of free text, so there a wrong choice that shares a number with the
right one scores 1 (checked with math-verify 0.7.0, the version R1-AQA pins): "Dominant 7th chord"
for "Major 7th chord" (both parse as 7), "0:00 - 0:08" for "0:09 - 0:11" (both 0), and
"<answer>Minor 6th</answer> <answer>Major 7th chord</answer>" for "Major 7th chord" (it reads the
whole completion, so a second tag scores when the first is wrong). Here accuracy is the string
match alone, and all three score 0.

Evaluation on MMAU uses a looser rule, MMAU's official string match: the prediction must name
every word of the answer and no word that only another choice has. mmau_correct re-implements it.

Usage:
    from reward import score, extract_answer, mmau_correct
    score("<answer>Man</answer>", "Man")           # Reward(accuracy=1.0, format=1.0, total=2.0)
    prediction = extract_answer(generated_text)
    mmau_correct(prediction, item["answer"], item["choices"])

Completions must be decoded with special tokens skipped before they are scored.
"""

import re
from dataclasses import dataclass

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>")  # no DOTALL: "." does not match a newline
FORMAT = re.compile(r"<answer>.*?</answer>", re.DOTALL)
THINK_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
DIRECT_FORMAT = re.compile(r"[^\s<>](?:[^\n<>]*[^\s<>])?")  # one line, no tags, no surrounding space
FORMATS = {"direct": DIRECT_FORMAT, "answer": FORMAT, "think": THINK_FORMAT}  # by prompt (data.PROMPTS)
WORD = re.compile(r"\b\w+\b")


def extract_answer(text: str) -> str:
    """The first single-line <answer>...</answer> content, else the whole text; stripped."""
    match = ANSWER_TAG.search(text)
    if match is None:
        return text.strip()
    return match.group(1).strip()


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 if the extracted answer equals the correct choice string exactly, else 0.0."""
    # R1-AQA's ground truth is "<answer>{choice}</answer>", parsed with the same regex and strip,
    # so the choice string is stripped too.
    return 1.0 if extract_answer(completion) == answer.strip() else 0.0


def format_reward(completion: str, prompt: str = "answer") -> float:
    """1.0 if the whole completion has the prompt's format: an answer block (answer), a think block
    then an answer block (think), or a bare one-line answer (direct)."""
    # The completion was decoded with special tokens skipped, so no <|im_end|> trails it. It is
    # not stripped, as in R1-AQA: any leading or trailing whitespace makes the format 0.
    return 1.0 if FORMATS[prompt].fullmatch(completion) else 0.0


@dataclass
class Reward:
    accuracy: float
    format: float
    total: float


def score(completion: str, answer: str, prompt: str = "answer",
          accuracy_weight: float = 1.0, format_weight: float = 1.0) -> Reward:
    """Both rewards of one completion and their weighted sum (R1-AQA: weights 1 and 1)."""
    accuracy = accuracy_reward(completion, answer)
    fmt = format_reward(completion, prompt)
    return Reward(accuracy, fmt, accuracy_weight * accuracy + format_weight * fmt)


def mmau_tokens(text: str) -> set[str]:
    """The set of lowercase words of a text, as MMAU's evaluation tokenizes it."""
    return set(WORD.findall(text.lower()))


def mmau_correct(prediction: str, answer: str, choices: list[str]) -> bool:
    """MMAU's string match: all answer words present, no word that only another choice has."""
    predicted = mmau_tokens(prediction)
    expected = mmau_tokens(answer)
    if not predicted:
        return False
    wrong = set()
    for choice in choices:
        tokens = mmau_tokens(choice)
        if tokens != expected:  # a reordering of the answer's words counts as the answer
            wrong |= tokens - expected
    return expected <= predicted and predicted.isdisjoint(wrong)
