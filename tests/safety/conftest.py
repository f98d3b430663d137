import pytest

from gateway.safety import DefaultClassifier


@pytest.fixture(scope="session")
def classifier() -> DefaultClassifier:
    # Built once: loading the term lists and the profanity model takes ~2 s.
    return DefaultClassifier()
