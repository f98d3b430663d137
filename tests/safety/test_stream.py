from gateway.safety import DefaultClassifier, StreamScanner
from gateway.safety.evaluation import flagged


def chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def test_phrase_split_across_chunks_is_caught(classifier: DefaultClassifier):
    text = "Well, here is my answer. I am going to kill you, that is the plan."
    for size in (1, 3, 7, 16):
        s = StreamScanner(classifier)
        for c in chunks(text, size):
            s.feed(c)
        assert s.result().violence.severity == "high", size


def test_result_is_worst_so_far(classifier: DefaultClassifier):
    s = StreamScanner(classifier)
    s.feed("fuck this. ")
    assert s.result().profanity.detected
    assert s.result().violence.severity == "safe"
    for _ in range(20):  # the profane chunk scrolls out of the window
        s.feed("Then we compiled the code and ran the tests again. ")
    assert s.result().profanity.detected


def test_benign_stream_stays_clean(classifier: DefaultClassifier):
    text = "To stop it, kill the process and then shoot a photo of the bomb-sniffing dog. " * 5
    s = StreamScanner(classifier)
    for c in chunks(text, 5):
        s.feed(c)
    assert flagged(s.result()) == set()


class Recorder:
    """Wraps a classifier and records the length of every scanned window."""

    def __init__(self, inner: DefaultClassifier) -> None:
        self.inner, self.lengths = inner, []

    def scan(self, text: str) -> dict[str, int]:
        self.lengths.append(len(text))
        return self.inner.scan(text)


def test_each_feed_scans_only_the_chunk_plus_overlap(classifier: DefaultClassifier):
    rec = Recorder(classifier)
    s = StreamScanner(rec, overlap=64)  # type: ignore[arg-type]
    for c in chunks("lorem ipsum dolor sit amet " * 400, 10):
        s.feed(c)
    assert len(rec.lengths) == 1080
    assert max(rec.lengths) == 74  # never the whole 10 800 characters


def test_agrees_with_whole_text_classify_on_short_labelled_texts(classifier: DefaultClassifier):
    # Short texts fit in one window, so streaming must agree with classify().
    from gateway.safety.evaluation import load_rows

    for row in load_rows()[:150]:
        s = StreamScanner(classifier)
        for c in chunks(row["text"], 4):
            s.feed(c)
        whole = flagged(classifier.classify(row["text"]))
        assert flagged(s.result()) >= whole - {"profanity"}, row["text"]
