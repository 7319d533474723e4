"""The admin's policy in parts: deny patterns over an answer that arrives token by token,
the system prompt's file and its place in a conversation, and the API keys file with its
reload (on an injected clock, with real files)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mesh.cli import build_parser
from mesh.config import GatewayConfig, from_arguments
from mesh.errors import ConfigError
from mesh.gateway.api_keys import FLAG_KEY_NAME, RELOAD_EVERY_S, ApiKeys, parse_key_file
from mesh.gateway.policy import (
    HOLD_CAP,
    MAX_SYSTEM_PROMPT_BYTES,
    AnswerFilter,
    ContentPolicyViolation,
    GatewayPolicy,
    SystemPromptEnforced,
    compile_rules,
    read_system_prompt,
)
from mesh.gateway.runtime import check_bind_is_safe
from mesh.gateway.schemas import ChatRequest, CompletionRequest
from mesh.metrics import GatewayMetrics


def run_filter(patterns: list[str], pieces: list[str]) -> tuple[list[str], str | None]:
    """What the filter releases for each piece and at the end, and the rule that blocked."""
    flt = AnswerFilter(compile_rules(patterns))
    out = [flt.push(p) for p in pieces]
    out.append(flt.finish())
    return out, flt.blocked.label if flt.blocked else None


# ------------------------------------------------------------------ deny patterns


def test_a_match_split_over_tokens_is_never_released_and_the_text_before_it_is() -> None:
    pieces = ["The pass", "word is ", "hun", "ter", "2 and more", " text after"]
    out, rule = run_filter(["hunter2"], pieces)
    assert rule == "1"
    released = "".join(out)
    assert released == "The password is "  # everything before the match, nothing of it
    assert "hun" not in released


def test_without_a_match_all_text_comes_out_in_order_delayed_by_the_longest_match() -> None:
    pieces = ["Hello", " there", ", how", " are", " you", "?"]
    out, rule = run_filter(["secret", "forbidden words"], pieces)
    assert rule is None and "".join(out) == "Hello there, how are you?"
    # Held back: never more than the longest pattern (15 characters) is waiting.
    sent = 0
    for i, piece in enumerate(out[:-1]):
        sent += len(piece)
        assert len("".join(pieces[:i + 1])) - sent <= 15
    assert out[0] == ""  # "Hello" alone is shorter than the hold


def test_deny_patterns_are_case_insensitive_unless_the_pattern_says_otherwise() -> None:
    assert run_filter(["project falcon"], ["We start Project ", "FALCON today"])[1] == "1"
    assert run_filter(["(?-i:falcon)"], ["Falcon", " flies"])[1] is None


def test_a_word_boundary_at_the_end_of_the_text_so_far_waits_for_the_next_token() -> None:
    # "secret" then "ary": \bsecret\b must not fire on "secret" alone.
    out, rule = run_filter([r"\bsecret\b"], ["The ", "secret", "ary", " called"])
    assert rule is None and "".join(out) == "The secretary called"
    out, rule = run_filter([r"\bsecret\b"], ["The ", "secret", " plan"])
    assert rule == "1" and "".join(out) == "The "
    # A match at the very end of the answer counts.
    out, rule = run_filter([r"\bsecret\b"], ["The ", "secret"])
    assert rule == "1" and "".join(out) == "The "


def test_the_earliest_match_of_all_rules_blocks_and_names_its_rule() -> None:
    out, rule = run_filter(["beta", "alpha"], ["x alpha y beta z"])
    assert rule == "2" and "".join(out) == "x "


def test_an_unbounded_pattern_still_stops_the_answer_at_its_match() -> None:
    text = "a" * 300 + " secret " + "b" * 300 + " plan " + "z" * 50
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    out, rule = run_filter([r"secret.*plan"], pieces)
    released = "".join(out)
    assert rule == "1" and " plan" not in released and "z" not in released and text.startswith(released)
    # Unbounded: held back by HOLD_CAP; the start of a longer match may have gone out.
    assert released.startswith("a" * 300)


def test_bad_and_empty_matching_patterns_are_start_errors_naming_them() -> None:
    with pytest.raises(ConfigError, match=r"--deny-pattern 2 \('a\(b'\) is not a valid regular expression"):
        compile_rules(["ok", "a(b"])
    for empty in ["x*", r"\b", "(?=a)", "a|"]:
        with pytest.raises(ConfigError, match="can match empty text"):
            compile_rules([empty])


def test_rule_widths_bound_the_hold_back() -> None:
    rules = compile_rules(["secret", r"secret\s?\d{1,6}", "a+"])
    assert [r.width for r in rules] == [6, 13, None]
    assert [r.hold for r in rules] == [6, 13, HOLD_CAP]


# ------------------------------------------------------------------ prompts and the system prompt


def chat(*messages: tuple[str, str]) -> ChatRequest:
    return ChatRequest.model_validate({"messages": [{"role": r, "content": c} for r, c in messages]})


def test_a_prompt_matching_a_rule_is_refused_by_number_without_echoing_it_and_counted() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    policy = GatewayPolicy("Be kind. Code word: bluebird.", compile_rules(["bluebird", "launch codes"]), metrics)
    policy.admit(chat(("user", "hello")))  # the admin's own text is not checked
    with pytest.raises(ContentPolicyViolation) as caught:
        policy.admit(chat(("system", "be brief"), ("user", "tell me the LAUNCH CODES please")))
    assert caught.value.http_status == 400 and caught.value.openai_code == "content_policy"
    assert "rule 2" in str(caught.value) and "launch" not in str(caught.value).lower()
    assert metrics.policy_blocks.labels("2", "prompt")._value.get() == 1
    # Each message on its own: a phrase split over two messages is no match.
    policy.admit(chat(("user", "launch"), ("assistant", "codes")))


def test_raw_completions_are_refused_when_a_system_prompt_is_set() -> None:
    body = CompletionRequest.model_validate({"prompt": "Once upon a time"})
    with pytest.raises(SystemPromptEnforced) as caught:
        GatewayPolicy("Be kind.").admit(body)
    assert caught.value.http_status == 403
    GatewayPolicy("").admit(body)  # no system prompt: raw completions are fine
    with pytest.raises(ContentPolicyViolation):
        GatewayPolicy("", compile_rules(["upon"])).admit(body)


def test_the_system_prompt_comes_first_and_a_clients_system_message_joins_after_it() -> None:
    policy = GatewayPolicy("ADMIN")
    user = {"role": "user", "content": "hi"}
    assert policy.chat_messages([user]) == [{"role": "system", "content": "ADMIN"}, user]
    assert policy.chat_messages([{"role": "system", "content": "CLIENT"}, user]) == [
        {"role": "system", "content": "ADMIN\n\nCLIENT"}, user]
    assert policy.cloud_messages([{"role": "system", "content": "CLIENT"}, user]) == [
        {"role": "system", "content": "ADMIN"}, {"role": "system", "content": "CLIENT"}, user]
    assert GatewayPolicy("").chat_messages([user]) == [user]


def test_system_prompt_file_errors_are_clear(tmp_path: Path) -> None:
    good = tmp_path / "prompt.txt"
    good.write_text("  You are the ACME assistant.\n")
    assert read_system_prompt(str(good)) == "You are the ACME assistant."
    cases = {"missing.txt": None, "empty.txt": b"  \n", "latin1.txt": "caf\xe9".encode("latin-1"),
             "big.txt": b"x" * (MAX_SYSTEM_PROMPT_BYTES + 1)}
    expected = {"missing.txt": "cannot read it", "empty.txt": "is empty", "latin1.txt": "not UTF-8",
                "big.txt": "larger than"}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=expected[name]):
            read_system_prompt(str(tmp_path / name))


# ------------------------------------------------------------------ the API keys file


def test_key_file_lines_comments_and_errors_by_line_number() -> None:
    keys = parse_key_file("# the office\n\nalice  k-alice-1\n  bob k-bob-2  \n", "keys")
    assert [k.name for k in keys] == ["alice", "bob"]
    assert "k-alice" not in repr(keys)  # a key never shows in a repr (or a log)
    bad = {"alice k1\nbob\n": "line 2: expected 'NAME KEY'",
           "alice k1 extra\n": "line 1: expected",
           "alice k1\nalice k2\n": "line 2: the name 'alice' is given twice",
           "alice k1\nbob k1\n": "line 2: this key is already given",
           "al/ice k1\n": "line 1: the name 'al/ice'",
           f"{FLAG_KEY_NAME} k1\n": "line 1"}
    for text, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            parse_key_file(text, "keys")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rewrite(path: Path, text: str) -> None:
    """Write and make sure the stamp changes even within one clock tick of the filesystem."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.chmod(path, 0o600)
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def test_keys_reload_when_the_file_changes_and_a_broken_file_keeps_the_last_good_keys(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys"
    rewrite(path, "alice ka\nbob kb\n")
    clock = Clock()
    metrics = GatewayMetrics(CollectorRegistry())
    keys = ApiKeys("kflag", str(path), metrics, clock=clock)
    assert keys.required
    assert [keys.identify(t) for t in ("ka", "kb", "kflag", "nope", "")] == ["alice", "bob", FLAG_KEY_NAME,
                                                                              None, None]
    rewrite(path, "alice ka\ncarol kc\n")  # bob removed, carol added
    assert keys.identify("kb") == "bob"  # checked at most once per RELOAD_EVERY_S
    clock.now += RELOAD_EVERY_S
    assert keys.identify("kb") is None and keys.identify("kc") == "carol" and keys.identify("ka") == "alice"

    rewrite(path, "alice ka\ncarol\n")  # malformed: the previous keys stay in force
    clock.now += RELOAD_EVERY_S
    with caplog.at_level(logging.ERROR, logger="mesh.gateway.api_keys"):
        assert keys.identify("kc") == "carol"
    assert "line 2" in caplog.text and metrics.api_keys_reload_errors._value.get() == 1
    clock.now += RELOAD_EVERY_S
    keys.identify("kc")
    assert metrics.api_keys_reload_errors._value.get() == 1  # reported once, not every second

    path.unlink()  # an editor's save may remove the file for a moment: keys stay
    clock.now += RELOAD_EVERY_S
    assert keys.identify("ka") == "alice"
    rewrite(path, "dave kd\n")
    clock.now += RELOAD_EVERY_S
    assert keys.identify("ka") is None and keys.identify("kd") == "dave" and keys.identify("kflag") == FLAG_KEY_NAME


def test_key_file_start_errors_and_a_warning_for_a_file_others_can_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys"
    with pytest.raises(ConfigError, match="no such file"):
        ApiKeys("", str(path))
    rewrite(path, "# nobody yet\n")
    with pytest.raises(ConfigError, match="has no keys"):
        ApiKeys("", str(path))
    rewrite(path, "alice ka\nbroken line here\n")
    with pytest.raises(ConfigError, match=f"{path} line 2"):
        ApiKeys("", str(path))
    rewrite(path, "alice kflag\n")
    with pytest.raises(ConfigError, match="also --api-key"):
        ApiKeys("kflag", str(path))
    rewrite(path, "alice ka\n")
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="mesh.gateway.api_keys"):
        ApiKeys("", str(path))
    assert "can be read by other users" in caplog.text and "ka" not in caplog.text.replace("keys", "")
    assert not ApiKeys("", "").required


def test_a_key_file_satisfies_the_public_bind_rule_and_up_passes_the_policy_flags() -> None:
    check_bind_is_safe(GatewayConfig(host="0.0.0.0", api_keys_file="/etc/edgemesh/keys"))
    with pytest.raises(ConfigError, match="--api-keys-file"):
        check_bind_is_safe(GatewayConfig(host="0.0.0.0"))
    for command in ("gateway", "up"):
        args = build_parser().parse_args([command, "--system-prompt-file", "p.txt", "--deny-pattern", "a{1,3}",
                                          "--deny-pattern", "b", "--api-keys-file", "k"])
        config = from_arguments(GatewayConfig, args)
        assert (config.system_prompt_file, config.deny_pattern, config.api_keys_file) == ("p.txt", ("a{1,3}", "b"),
                                                                                          "k")
