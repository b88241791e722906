"""The prefix-aware routing rule, the replica flags and the merged /metrics, without starting Ray."""

import sys
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.cli import main
from tokenmill.errors import InvalidRequestError
from tokenmill.scale.config import ScaleConfig
from tokenmill.scale.metrics import MetricsBoard, merge
from tokenmill.scale.routing import PREFIX_BLOCKS, preferred, prefix_key, rank

BLOCK = 16


def test_prompts_sharing_their_first_blocks_share_a_key_and_later_tokens_do_not_matter():
    shared = list(range(PREFIX_BLOCKS * BLOCK))
    assert prefix_key(shared + [1, 2, 3], BLOCK) == prefix_key(shared + [9] * 40, BLOCK)
    assert prefix_key(shared, BLOCK) != prefix_key([7] + shared[1:], BLOCK)


def test_only_full_blocks_count_and_a_prompt_under_one_block_has_no_key():
    assert prefix_key(list(range(BLOCK - 1)), BLOCK) is None
    one_block = list(range(BLOCK))
    assert prefix_key(one_block + [5], BLOCK) == prefix_key(one_block + [6, 7], BLOCK)
    assert prefix_key(one_block + list(range(BLOCK)), BLOCK) != prefix_key(one_block, BLOCK)


def test_a_key_goes_to_its_replica_first_and_the_others_rank_second():
    loads = {"a": 0, "b": 0, "c": 0}
    key = prefix_key(list(range(64)), BLOCK)
    ranks, reason = rank(key, loads)
    owner = preferred(key, list(loads))
    assert reason == "prefix"
    assert ranks[0] == [owner] and sorted(ranks[1]) == sorted(set(loads) - {owner})


def test_keys_spread_over_replicas_and_removing_one_moves_only_its_keys():
    keys = [prefix_key([i] * 64, BLOCK) for i in range(300)]
    before = {k: preferred(k, ["a", "b", "c"]) for k in keys}
    assert all(n > 60 for n in Counter(before.values()).values())  # about 100 each
    after = {k: preferred(k, ["a", "b"]) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "c")


def test_a_busy_owner_is_passed_over_for_the_least_loaded_rank():
    key = prefix_key(list(range(64)), BLOCK)
    owner = preferred(key, ["a", "b"])
    other = "b" if owner == "a" else "a"
    assert rank(key, {owner: 4, other: 0}, max_imbalance=4)[1] == "prefix"
    ranks, reason = rank(key, {owner: 5, other: 0}, max_imbalance=4)
    assert reason == "least_loaded" and ranks == [[other], [owner]]
    assert rank(None, {owner: 0, other: 0}) == ([[owner, other]], "least_loaded")


def test_without_a_prefix_replicas_rank_by_load_so_an_idle_one_is_tried_first():
    assert rank(None, {"a": 3, "b": 0, "c": 1, "d": 0}) == ([["b", "d"], ["c"], ["a"]], "least_loaded")


def test_replicas_without_ray_fail_at_once_saying_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert main(["serve", "--replicas", "2", "--model", "no-such-model-is-loaded"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'tokenmill[ray]'" in err and "--replicas" in err


def test_autoscaling_flags_become_ray_serves_autoscaling_config():
    config = ScaleConfig(1, min_replicas=0, max_replicas=3, target_ongoing_requests=2, upscale_delay=1,
                         downscale_delay=5)
    assert config.deployment_options() == {"autoscaling_config": {
        "min_replicas": 0, "max_replicas": 3, "initial_replicas": 1, "target_ongoing_requests": 2,
        "upscale_delay_s": 1, "downscale_delay_s": 5, "look_back_period_s": 1.0}}
    assert ScaleConfig(2).deployment_options() == {"num_replicas": 2}
    with pytest.raises(InvalidRequestError, match="--min-replicas 0"):
        ScaleConfig(0)
    with pytest.raises(InvalidRequestError, match=r"\[--min-replicas 1, --max-replicas 2\]"):
        ScaleConfig(3, min_replicas=1, max_replicas=2)


def _replica_text(hits: float) -> str:
    registry = CollectorRegistry()
    PromCounter("tokenmill:prefix_cache_hits", "Prompt tokens found.", ["model_name"], registry=registry
                ).labels("m").inc(hits)
    return generate_latest(registry).decode()


def test_merged_metrics_label_each_replica_and_keep_every_sample():
    board = MetricsBoard()
    board.put("r1", _replica_text(3))
    board.put("r2", _replica_text(5))
    text = merge(board.texts()).decode()
    samples = {s.labels["replica"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "tokenmill:prefix_cache_hits_total"}
    assert samples == {"r1": 3, "r2": 5}
    assert text.count("# TYPE tokenmill:prefix_cache_hits_total counter") == 1  # one family, not one per replica
