import pytest

from gateway.safety.profanity import ProfanityModel

TEXTS = [
    "you are a fucking idiot",
    "kill the process",
    "what the f*ck",
    "shit happens",
    "I love cats",
    "",
    "the the the",
    "Bitch please, you dumb ass " * 30,
    "Quarterly revenue grew by 4 percent while costs fell.",
]


def test_fast_path_equals_scikit_learn():
    predict_prob = pytest.importorskip("profanity_check").predict_prob
    model = ProfanityModel()
    expected = predict_prob(TEXTS)
    for text, want in zip(TEXTS, expected):
        assert model.probability(text) == pytest.approx(float(want), abs=1e-9), text


def test_normalized_fast_path_equals_regex_tokenizer():
    from gateway.safety.lexicon import load

    model, norm = ProfanityModel(), load().normalizer.normalize
    for text in TEXTS + ["f*ck you, a$$hole", "k i l l  y o u"]:
        view = norm(text)
        assert model.probability_normalized(view) == pytest.approx(model.probability(view), abs=1e-12)
