import msgspec
import pytest

from gateway.protocol import ContentFilterResults, Detection, Severity
from gateway.safety import Policy, SafetyConfig, Thresholds, any_filtered, evaluate, merge


def results(**kw) -> ContentFilterResults:
    r = ContentFilterResults()
    for name, value in kw.items():
        setattr(r, name, Detection(detected=value) if isinstance(value, bool) else Severity(severity=value))
    return r


def test_annotate_never_filters():
    r = evaluate(results(violence="high", hate="high", jailbreak=True), Policy())
    assert not any_filtered(r)
    assert r.violence.severity == "high" and r.jailbreak.detected


def test_annotate_clears_incoming_filtered_flags():
    incoming = ContentFilterResults(violence=Severity(filtered=True, severity="low"))
    assert not any_filtered(evaluate(incoming, Policy()))


def test_block_at_thresholds():
    policy = Policy(mode="block", thresholds=Thresholds(violence="medium", hate="low", profanity=False))
    r = evaluate(results(violence="low", hate="low", profanity=True), policy)
    assert (r.violence.filtered, r.hate.filtered, r.profanity.filtered) == (False, True, False)
    assert any_filtered(r)
    r = evaluate(results(violence="medium"), policy)
    assert r.violence.filtered
    assert not any_filtered(evaluate(results(violence="low", sexual="low"), policy))


def test_off_and_detections():
    policy = Policy(mode="block", thresholds=Thresholds(violence="off", jailbreak=True))
    r = evaluate(results(violence="high", jailbreak=True), policy)
    assert not r.violence.filtered and r.jailbreak.filtered


def test_config_from_toml():
    raw = b"""
mode = "block"
thresholds = { violence = "medium", hate = "low", jailbreak = true }
endpoint = "https://api.openai.com/v1/moderations"
timeout_s = 0.8
model = "omni-moderation-latest"
"""
    cfg = msgspec.toml.decode(raw, type=SafetyConfig)
    assert cfg.policy() == Policy(mode="block", thresholds=Thresholds(violence="medium", hate="low", jailbreak=True))
    assert cfg.timeout_s == 0.8 and cfg.endpoint.endswith("/moderations")
    assert msgspec.toml.decode(b"", type=SafetyConfig).mode == "annotate"


@pytest.mark.parametrize(
    "raw",
    [
        b'mode = "blok"',
        b'thresholds = { violense = "low" }',
        b'thresholds = { hate = "severe" }',
        b"timeout_s = 0",
        b"unknown = 1",
    ],
)
def test_config_rejects_mistakes(raw):
    with pytest.raises(msgspec.ValidationError):
        msgspec.toml.decode(raw, type=SafetyConfig)


def test_merge_keeps_the_graver():
    a = results(violence="low", profanity=True)
    b = results(violence="high", hate="medium")
    m = merge(a, b)
    assert (m.violence.severity, m.hate.severity, m.profanity.detected) == ("high", "medium", True)
