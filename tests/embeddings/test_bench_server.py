"""`bench embed`'s server run takes the model as --model gives it: a folder too."""

from argparse import Namespace

from tokenmill.bench.embed import _serve_and_load


def test_the_server_run_loads_a_model_given_as_a_folder(minilm_path):
    # The folder's path went out as the request's model, which the server names by its last part: 404s.
    rate = _serve_and_load(Namespace(model=str(minilm_path), dtype="float32", clients=2), ["a sentence"] * 40, [])
    assert rate > 0
