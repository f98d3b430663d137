import pytest

from gateway.safety.lexicon import expand, load


@pytest.fixture(scope="module")
def norm():
    return load().normalizer.normalize


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Kill YOU!", " kill you "),
        ("k1ll y0u", " kill you "),
        ("k i l l", " kill "),
        ("k.i.l.l y.o.u", " kill you "),
        ("k\u200bi\u200dll", " kill "),  # zero-width characters
        ("\u043a\u0456ll \u0443ou", " kill you "),  # Cyrillic look-alikes
        ("ｋｉｌｌ", " kill "),  # full-width, folded by NFKC
        ("kíll", " kill "),  # accents stripped
        ("f*ck", " f#ck "),
        ("a$$hole", " asshole "),
        ("sh!t", " shit "),
    ],
)
def test_obfuscations_fold_to_canonical_form(norm, text, expected):
    assert norm(text) == expected


@pytest.mark.parametrize("text", ["top 10 list", "costs $5", "version 3.11", "hello!"])
def test_digits_and_symbols_alone_are_left_alone(norm, text):
    # Leetspeak is decoded only next to letters.
    assert norm(text) == " " + " ".join(text.lower().replace("$", " ").replace(".", " ").replace("!", " ").split()) + " "


def test_brace_expansion_nests():
    assert expand("a {b {c|d}|e}{| f}") == ["a b c", "a b c f", "a b d", "a b d f", "a e", "a e f"]
    with pytest.raises(ValueError):
        expand("a {b|c")


def test_squeezed_views_cover_only_the_stretched_region(norm):
    from gateway.safety.normalize import squeezed_views

    assert squeezed_views(norm("nothing stretched here")) == ()
    view = norm("lorem ipsum " * 50 + "what the fuuuuck " + "dolor sit " * 50)
    two, one = squeezed_views(view)
    assert " fuuck " in two and " fuck " in one
    assert len(one) < 120 and one.startswith(" ") and one.endswith(" ")
