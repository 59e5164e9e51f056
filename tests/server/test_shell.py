"""`--shell` driven through a pseudo-terminal: a prompt, an answer, /reset, /exit."""

import os
import re
import pty
import select
import subprocess
import sys
import time

import pytest
from server_process import TEST_FLAGS

pytestmark = pytest.mark.slow  # an engine of its own


class Terminal:
    def __init__(self, cmd: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 240) -> str:
        """Everything up to and including `text`, which is consumed."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"never saw {text!r}; the terminal shows:\n{self.seen}")
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    pass
        head, _, self.seen = self.seen.partition(text)
        return head + text

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())


def turn(term: Terminal, message: str) -> tuple[int, int]:
    """(prompt tokens, reply tokens) of one exchange, from the line the shell prints after a reply."""
    term.type(message)
    answer = term.read_until("> ")
    found = re.search(r"\[(\d+) prompt tokens, (\d+) reply tokens", answer)
    assert found, answer
    return int(found[1]), int(found[2])


def test_shell_chat_reset_exit(tiny_model_dir, compile_cache):
    cmd = [sys.executable, "-m", "minisgl_jax", "--model", tiny_model_dir, "--shell", "--max-model-len", "256", "--shell-max-tokens", "16",
           "--compile-cache-dir", compile_cache, "--log-level", "warning", *TEST_FLAGS]
    term = Terminal(cmd)
    try:
        term.read_until("/exit quits")
        term.read_until("> ")
        first = turn(term, "hello there")
        assert first[1] >= 1
        second = turn(term, "and again")
        assert second[0] > first[0] + first[1]  # the history (first turn and its reply) is in the prompt
        term.type("/reset")
        assert "(history cleared)" in term.read_until("> ")
        assert turn(term, "hello there")[0] == first[0]
        term.type("/exit")
        assert term.proc.wait(30) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        os.close(term.master)
