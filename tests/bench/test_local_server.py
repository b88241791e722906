"""A server that `start_server` starts: what the caller sees when it fails to come up."""

import pytest

from tokenmill.bench.local_server import start_server


def test_a_server_that_exits_at_start_up_raises_with_its_output(tmp_path):
    with pytest.raises(RuntimeError) as failed:
        start_server(["--model", "no-such-model"], tmp_path / "serve.log")
    assert "the server exited with" in str(failed.value) and "unknown model 'no-such-model'" in str(failed.value)


def test_without_a_log_the_error_says_how_to_see_why():
    with pytest.raises(RuntimeError, match="run `tokenmill serve` to see why"):
        start_server(["--model", "no-such-model"])
