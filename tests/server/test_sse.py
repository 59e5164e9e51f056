"""An SSE event stays one line for every client line reader, whatever text the model produced."""

import json

from minisgl_jax.server.responses import sse


def test_unicode_line_separators_are_escaped_and_round_trip():
    text = "a\u2028b\u2029c\x85d\ne é 😀"
    event = sse({"text": text})
    lines = event.splitlines()  # splits at U+2028/U+2029/U+0085 too, as httpx's iter_lines does
    assert lines == [lines[0], ""] and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:]) == {"text": text}
    assert "é 😀" in event  # other text is sent as it is, not \\u-escaped
