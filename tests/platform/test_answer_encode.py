"""`gateway.httpresponse.encode`, the fast path's answer bytes: one status line, the answer's
headers in order, Content-Length (none for 204/304, whose body is dropped), and Date and Server
added unless the answer has its own, whatever their case, and only then."""

from __future__ import annotations

from hearth.gateway.answer import Answer
from hearth.gateway.httpresponse import encode


def _split(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    line, *rest = head.decode().split("\r\n")
    return line, [tuple(h.split(": ", 1)) for h in rest], body  # type: ignore[misc]


def _names(headers: list[tuple[str, str]]) -> list[str]:
    return [k.lower() for k, _ in headers]


def test_a_plain_answer_gets_its_length_a_date_and_the_server():
    line, headers, body = _split(encode(Answer(200, {"X-A": "1", "Content-Type": "t/x"}, b"hey")))
    assert line == "HTTP/1.1 200 OK"
    assert headers[:3] == [("X-A", "1"), ("Content-Type", "t/x"), ("Content-Length", "3")]
    assert _names(headers)[3:] == ["date", "server"]
    assert body == b"hey"


def test_a_date_or_server_of_the_answers_own_is_sent_once_in_any_case():
    raw = encode(Answer(200, {"DATE": "then", "sErVeR": "fn/1"}, b""))
    _, headers, _ = _split(raw)
    assert _names(headers).count("date") == 1 and ("DATE", "then") in headers
    assert _names(headers).count("server") == 1 and ("sErVeR", "fn/1") in headers


def test_a_header_that_only_mentions_date_or_server_does_not_replace_them():
    raw = encode(Answer(200, {"X-Date": "d", "X-Note": "date: server: x", "Dates": "1"}, b""))
    _, headers, _ = _split(raw)
    assert _names(headers).count("date") == 1 and _names(headers).count("server") == 1


def test_no_body_or_length_for_204_and_304_and_close_is_said():
    for status in (204, 304):
        raw = encode(Answer(status, {}, b"forged"), close=True)
        line, headers, body = _split(raw)
        assert line.startswith(f"HTTP/1.1 {status} ")
        assert "content-length" not in _names(headers) and body == b""
        assert ("Connection", "close") in headers


def test_a_status_without_a_reason_phrase_has_an_empty_one():
    assert encode(Answer(599, {}, b"")).startswith(b"HTTP/1.1 599 \r\n")
