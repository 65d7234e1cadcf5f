"""Tests for reward.py: the R1-AQA rewards and MMAU's string-match scorer.

Run: python -m pytest -q tests/test_reward.py
"""

from reward import (Reward, accuracy_reward, extract_answer, format_reward, mmau_correct,
                    mmau_tokens, score)

CHOICES = ["Man", "Woman", "Child", "Robot"]


# ----------------------------------------------------------------------------- extract_answer

def test_extract_answer_plain_tag():
    """The text inside the tags is the answer."""
    assert extract_answer("<answer>Man</answer>") == "Man"


def test_extract_answer_first_tag_wins():
    """With several answer tags, only the first counts."""
    assert extract_answer("<answer>Man</answer> or <answer>Woman</answer>") == "Man"


def test_extract_answer_strips_whitespace():
    """Whitespace inside the tags and around a tagless text is stripped."""
    assert extract_answer("<answer>  Man \t</answer>") == "Man"
    assert extract_answer("  Man \n") == "Man"
    assert extract_answer("I hear <answer> Man </answer> speaking") == "Man"


def test_extract_answer_newline_inside_tags_falls_back_to_whole_text():
    """Without DOTALL a tag spanning lines does not match, so the whole text is returned."""
    text = "<answer>\nMan\n</answer>"
    assert extract_answer(text) == "<answer>\nMan\n</answer>"


def test_extract_answer_skips_multiline_tag_for_a_later_single_line_one():
    """The first tag that fits on one line wins, even if an earlier one spans lines."""
    # The search cannot close the first tag before its newline; it then finds <answer>B</answer>.
    assert extract_answer("<answer>\nA</answer> <answer>B</answer>") == "B"


def test_extract_answer_empty():
    """An empty completion and empty tags both give the empty string."""
    assert extract_answer("") == ""
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("<answer>   </answer>") == ""


# ----------------------------------------------------------------------------- accuracy_reward

def test_accuracy_exact_match():
    """The correct choice inside the tags scores 1.0."""
    assert accuracy_reward("<answer>Man</answer>", "Man") == 1.0


def test_accuracy_wrong_choice():
    """Another choice scores 0.0."""
    assert accuracy_reward("<answer>Woman</answer>", "Man") == 0.0


def test_accuracy_is_case_sensitive():
    """A case difference is wrong."""
    assert accuracy_reward("<answer>man</answer>", "Man") == 0.0
    assert accuracy_reward("<answer>MAN</answer>", "Man") == 0.0


def test_accuracy_strips_both_sides():
    """Whitespace around the extracted answer and around the correct choice is ignored."""
    assert accuracy_reward("<answer> Man </answer>", " Man\n") == 1.0


def test_accuracy_inner_whitespace_counts():
    """Only the ends are stripped: a doubled inner space is a different string."""
    assert accuracy_reward("<answer>very  low</answer>", "very low") == 0.0


def test_accuracy_substring_choices():
    """A choice that is a substring of another is not confused with it, either way round."""
    assert accuracy_reward("<answer>very low</answer>", "low") == 0.0
    assert accuracy_reward("<answer>low</answer>", "very low") == 0.0
    assert accuracy_reward("<answer>low</answer>", "low") == 1.0


def test_accuracy_first_tag_wins():
    """Hedging with two tags is judged by the first one only."""
    assert accuracy_reward("<answer>Man</answer><answer>Woman</answer>", "Man") == 1.0
    assert accuracy_reward("<answer>Woman</answer><answer>Man</answer>", "Man") == 0.0


def test_accuracy_without_tags_uses_whole_text():
    """A bare answer is accepted; a sentence around it is not."""
    assert accuracy_reward("Man\n", "Man") == 1.0
    assert accuracy_reward("The answer is Man", "Man") == 0.0


def test_accuracy_newline_inside_tags_is_wrong():
    """A tag spanning lines is not parsed, and the whole text is not the choice."""
    assert accuracy_reward("<answer>\nMan\n</answer>", "Man") == 0.0


def test_accuracy_empty_completion():
    """An empty completion is wrong."""
    assert accuracy_reward("", "Man") == 0.0


def test_accuracy_think_variant():
    """The answer is found after a think block, even one spanning lines."""
    completion = "<think>A low voice.\nProbably an adult.</think>\n<answer>Man</answer>"
    assert accuracy_reward(completion, "Man") == 1.0
    assert accuracy_reward("<think>hmm</think>", "Man") == 0.0


# ----------------------------------------------------------------------------- format_reward

def test_format_answer_only():
    """A completion that is exactly one answer block scores 1.0."""
    assert format_reward("<answer>Man</answer>") == 1.0


def test_format_allows_newlines_and_empty_content():
    """DOTALL: the content may span lines or be empty."""
    assert format_reward("<answer>\nMan\n</answer>") == 1.0
    assert format_reward("<answer></answer>") == 1.0


def test_format_trailing_text_fails():
    """Anything after </answer>, even a newline, breaks the full match."""
    assert format_reward("<answer>Man</answer> I am sure.") == 0.0
    assert format_reward("<answer>Man</answer>\n") == 0.0


def test_format_leading_text_fails():
    """Anything before <answer>, even a space, breaks the full match."""
    assert format_reward(" <answer>Man</answer>") == 0.0
    assert format_reward("Answer: <answer>Man</answer>") == 0.0


def test_format_without_tags_or_empty():
    """A bare answer or an empty completion has no format."""
    assert format_reward("Man") == 0.0
    assert format_reward("") == 0.0
    assert format_reward("<answer>Man") == 0.0


def test_format_two_answer_blocks_pass():
    """Two back-to-back blocks still fully match the format."""
    # fullmatch forces the lazy ".*?" to stretch over "Man</answer><answer>Woman"
    assert format_reward("<answer>Man</answer><answer>Woman</answer>") == 1.0


def test_format_think_variant():
    """Think format needs a think block, optional whitespace, then an answer block."""
    completion = "<think>A low voice.\nAn adult.</think>\n <answer>Man</answer>"
    assert format_reward(completion, prompt="think") == 1.0
    assert format_reward("<think></think><answer>Man</answer>", prompt="think") == 1.0
    assert format_reward("<answer>Man</answer>", prompt="think") == 0.0
    assert format_reward("<think>hmm</think>", prompt="think") == 0.0
    assert format_reward("<think>hmm</think> so <answer>Man</answer>", prompt="think") == 0.0


def test_format_think_completion_fails_plain_format():
    """Without prompt="think" a completion that starts with <think> has no format."""
    assert format_reward("<think>hmm</think><answer>Man</answer>") == 0.0


def test_format_direct_prompt_is_a_bare_line():
    """The direct prompt asks for the answer alone: one line, no tags, no space around it."""
    assert format_reward("very low", prompt="direct") == 1.0
    assert format_reward("M", prompt="direct") == 1.0
    for bad in ["", " Man", "Man\n", "<answer>Man</answer>", "Man\nWoman", "a <b> c"]:
        assert format_reward(bad, prompt="direct") == 0.0, bad
    assert score("Man", "Man", prompt="direct") == Reward(1.0, 1.0, 2.0)


# ----------------------------------------------------------------------------- score

def test_score_totals():
    """With unit weights the total is accuracy + format, so 0, 1 or 2."""
    assert score("<answer>Man</answer>", "Man") == Reward(1.0, 1.0, 2.0)
    assert score("<answer>Woman</answer>", "Man") == Reward(0.0, 1.0, 1.0)
    assert score("Man", "Man") == Reward(1.0, 0.0, 1.0)
    assert score("", "Man") == Reward(0.0, 0.0, 0.0)


def test_score_weights():
    """The total is accuracy_weight * accuracy + format_weight * format."""
    # right and formatted: 2.0 * 1 + 0.5 * 1 = 2.5; formatted only: 2.0 * 0 + 0.5 * 1 = 0.5
    weights = dict(accuracy_weight=2.0, format_weight=0.5)
    assert score("<answer>Man</answer>", "Man", **weights) == Reward(1.0, 1.0, 2.5)
    assert score("<answer>Woman</answer>", "Man", **weights) == Reward(0.0, 1.0, 0.5)
    assert score("<answer>Man</answer>", "Man", format_weight=0.0) == Reward(1.0, 1.0, 1.0)


def test_score_think_flag():
    """The prompt selects the format pattern; accuracy does not depend on it."""
    completion = "<think>hmm</think><answer>Man</answer>"
    assert score(completion, "Man", prompt="think") == Reward(1.0, 1.0, 2.0)
    assert score(completion, "Man") == Reward(1.0, 0.0, 1.0)


# ----------------------------------------------------------------------------- MMAU scorer

def test_mmau_tokens():
    """Tokens are the set of lowercase \\w+ words; punctuation and apostrophes split words."""
    # "the man, a dog's bark! the" -> the, man, a, dog, s, bark (the repeated "the" counts once)
    assert mmau_tokens("The MAN, a dog's bark! The") == {"the", "man", "a", "dog", "s", "bark"}
    assert mmau_tokens("120 BPM in C_major") == {"120", "bpm", "in", "c_major"}
    assert mmau_tokens("") == set()
    assert mmau_tokens(" ... !") == set()


def test_mmau_exact_choice():
    """The answer itself is correct; another choice is wrong."""
    assert mmau_correct("Man", "Man", CHOICES) is True
    # {woman} does not contain the word "man": words are compared, not substrings
    assert mmau_correct("Woman", "Man", CHOICES) is False


def test_mmau_choice_with_extra_words():
    """Extra words are fine as long as none belongs only to another choice."""
    # prediction {the, speaker, is, a, man} contains {man}, misses {woman, child, robot}
    assert mmau_correct("The speaker is a man", "Man", CHOICES) is True


def test_mmau_two_choices_named():
    """Naming another choice as well is wrong."""
    assert mmau_correct("Man or woman", "Man", CHOICES) is False
    assert mmau_correct("Man, Woman, Child or Robot", "Man", CHOICES) is False


def test_mmau_case_and_punctuation():
    """Case and punctuation are ignored."""
    assert mmau_correct("the MAN.", "man", ["man", "woman"]) is True


def test_mmau_empty_prediction():
    """A prediction without any word is wrong."""
    assert mmau_correct("", "Man", CHOICES) is False
    assert mmau_correct("...", "Man", CHOICES) is False


def test_mmau_choices_sharing_words():
    """Words shared with the answer do not count against it."""
    choices = ["Man", "Man and woman"]
    # answer "Man": other-choice words = {man, and, woman} - {man} = {and, woman}
    assert mmau_correct("Man", "Man", choices) is True          # {man}: nothing of {and, woman}
    assert mmau_correct("Man and woman", "Man", choices) is False  # has "and", "woman"
    # answer "Man and woman": other-choice words = {man} - {man, and, woman} = {}
    assert mmau_correct("Man", "Man and woman", choices) is False  # misses "and", "woman"
    assert mmau_correct("A man and a woman", "Man and woman", choices) is True


def test_mmau_substring_choices():
    """The choices "low" and "very low" differ by the word "very", and that decides."""
    choices = ["low", "very low", "high"]
    # answer "low": other-choice words = {very} | {high}
    assert mmau_correct("low", "low", choices) is True
    assert mmau_correct("very low", "low", choices) is False
    # answer "very low": other-choice words = {} | {high}; "low" alone misses "very"
    assert mmau_correct("low", "very low", choices) is False
    assert mmau_correct("Very low.", "very low", choices) is True


def test_mmau_permuted_choice_is_ignored():
    """A choice with the answer's word set is skipped, so naming it counts as correct."""
    choices = ["dog barking", "barking dog", "cat meowing"]
    # answer "dog barking": "barking dog" has the same set {dog, barking} and is skipped,
    # so other-choice words = {cat, meowing}
    assert mmau_correct("barking dog", "dog barking", choices) is True
    assert mmau_correct("dog barking", "dog barking", choices) is True
    assert mmau_correct("dog barking and cat meowing", "dog barking", choices) is False


def test_mmau_numeric_choices():
    """Numbers are words too."""
    choices = ["1", "2", "3", "4"]
    assert mmau_correct("3", "3", choices) is True
    assert mmau_correct("There are 3 speakers", "3", choices) is True
    assert mmau_correct("3 or 4", "3", choices) is False
