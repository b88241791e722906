"""The API-key check on the header as Starlette hands it over (bytes decoded as Latin-1)."""

from tokenmill.server.auth import admitted


def _header(text: str) -> str:
    """An Authorization header a client sent as UTF-8, as the server reads it."""
    return text.encode("utf-8").decode("latin-1")


def test_a_key_of_other_letters_sent_as_utf8_is_admitted_and_its_latin1_spelling_is_not():
    # The key's UTF-8 bytes were refused and the Latin-1 spelling (other bytes) admitted.
    assert admitted(_header("Bearer clé"), "clé")
    assert not admitted("Bearer clé", "clé")


def test_the_scheme_is_case_blind_and_the_key_exact():
    assert admitted(_header("bearer s3cret"), "s3cret") and admitted(_header("Bearer  s3cret"), "s3cret")
    assert not admitted(_header("Bearer s3cret2"), "s3cret") and not admitted(_header("Basic s3cret"), "s3cret")
    assert admitted("", None)
