"""The prefix-aware routing rule, the replica flags and the merged /metrics, without starting Ray."""

import asyncio
import sys
import uuid
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.cli import main
from tokenmill.config import EngineConfig, ServerConfig
from tokenmill.errors import InvalidRequestError, ModelNotFoundError
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
    order, reason = rank(key, loads)
    owner = preferred(key, list(loads))
    assert reason == "prefix"
    assert order[0] == owner and sorted(order[1:]) == sorted(set(loads) - {owner})


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
    assert rank(key, {owner: 5, other: 0}, max_imbalance=4) == ([other, owner], "least_loaded")


def test_without_a_prefix_replicas_rank_by_load_so_an_idle_one_is_tried_first():
    assert rank(None, {"a": 3, "b": 0, "c": 1, "d": 0}) == (["b", "d", "c", "a"], "least_loaded")


def test_equally_loaded_replicas_take_turns_so_a_burst_on_unchanged_loads_spreads():
    loads = {"a": 1, "b": 0, "c": 0, "d": 0}
    firsts = [rank(None, loads, turn=turn)[0][0] for turn in range(6)]
    assert firsts == ["b", "c", "d", "b", "c", "d"]
    assert all(rank(None, loads, turn=turn)[0][-1] == "a" for turn in range(6))  # the busier one stays last


@pytest.mark.ray  # needs tokenmill[ray]; starts no Ray cluster (about a second)
def test_a_cold_burst_spreads_when_only_one_replica_has_a_cached_queue_length():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from tokenmill.scale.request_router import PrefixAwareRouter

    deployment = DeploymentID(name="engine", app_name="tokenmill")

    class FakeReplica:  # what Ray Serve's routing loop reads of a RunningReplica
        def __init__(self, name: str) -> None:
            self.replica_id = ReplicaID(unique_id=name, deployment_id=deployment)
            self.max_ongoing_requests, self.ongoing = 32, 0
            self.node_id, self.availability_zone, self.multiplexed_model_ids = "", None, set()

        async def get_queue_len(self, *, deadline_s: float) -> int:
            await asyncio.sleep(0.01)  # a probe is an RPC: other routing tasks run meanwhile
            return self.ongoing

        def push_proxy_handle(self, handle: object) -> None:
            pass

    async def burst() -> Counter:
        router = PrefixAwareRouter(deployment, DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True)
        router.initialize_state()
        probed, fresh = FakeReplica("probed"), FakeReplica("fresh")
        router.update_replicas([probed, fresh])
        await asyncio.sleep(0.05)  # Ray Serve probes new replicas once, on arrival
        # Then one entry expires, as when that replica sat idle past the 10 s cache timeout.
        router.replica_queue_len_cache.invalidate_key(fresh.replica_id)

        async def send(i: int) -> str:
            # As Ray Serve's handle does: route (no key: a prompt under one block), then send and count it.
            request = PendingRequest(args=[None], kwargs={}, metadata=RequestMetadata(str(i), uuid.uuid4().hex))
            replica = await router._choose_replica_for_request(request)
            router.on_send_request(replica.replica_id)
            replica.ongoing += 1
            return replica.replica_id.unique_id

        return Counter(await asyncio.gather(*(send(i) for i in range(8))))

    # Before: both in one rank, Ray Serve took the cached replica for all 8 and only probed the other.
    assert asyncio.run(burst()) == {"probed": 4, "fresh": 4}


def test_replicas_without_ray_fail_at_once_saying_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert main(["serve", "--replicas", "2", "--model", "no-such-model-is-loaded"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'tokenmill[ray]'" in err and "--replicas" in err


@pytest.mark.parametrize("flags, message", [
    (["--target-ongoing-requests", "2"], "give --min-replicas or --max-replicas too"),  # else a fixed 2, silently
    (["--upscale-delay", "1"], "give --min-replicas or --max-replicas too"),
    (["--max-replicas", "3", "--target-ongoing-requests", "nan"], "--target-ongoing-requests must be > 0"),
    (["--max-replicas", "3", "--downscale-delay", "nan"], "the scaling delays >= 0"),
    (["--upscale-delay", "1"], "the scaling delays need --replicas N"),  # no --replicas: one engine, no autoscaling
])
def test_autoscaling_settings_that_would_not_take_effect_are_refused_before_ray(capsys, flags, message):
    replicas = [] if "need --replicas" in message else ["--replicas", "2"]
    assert main(["serve", *replicas, *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_bench_scale_without_ray_fails_at_once_saying_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert main(["bench", "scale", "autoscale"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'tokenmill[ray]'" in err and "`bench scale`" in err


@pytest.mark.ray  # needs tokenmill[ray]; starts no Ray cluster
def test_a_bad_model_fails_before_ray_starts_and_prefixes_are_keyed_by_a_generative_model(monkeypatch):
    from tokenmill.scale import deployment

    monkeypatch.setattr(deployment, "start_ray", lambda *args: pytest.fail("Ray started"))
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        deployment.serve_replicas(EngineConfig(), ServerConfig(), ["no-such-model"], ScaleConfig(replicas=2))
    assert deployment.prefix_key_model(["all-minilm-l6-v2", "chat=smollm2-135m"]) == "smollm2-135m"
    assert deployment.prefix_key_model(["all-minilm-l6-v2"]) is None


def test_autoscaling_flags_become_ray_serves_autoscaling_config():
    config = ScaleConfig(1, min_replicas=0, max_replicas=3, target_ongoing_requests=2, upscale_delay=1,
                         downscale_delay=5)
    assert config.deployment_options() == {"autoscaling_config": {
        "min_replicas": 0, "max_replicas": 3, "initial_replicas": 1, "target_ongoing_requests": 2,
        "upscale_delay_s": 1, "downscale_delay_s": 5, "metrics_interval_s": 0.5, "look_back_period_s": 2.0}}
    assert ScaleConfig(2).deployment_options() == {"num_replicas": 2}
    for alone in (ScaleConfig, lambda n: ScaleConfig(n, min_replicas=0)):  # the latter said "--min-replicas >= 0"
        with pytest.raises(InvalidRequestError, match="--min-replicas 0 --max-replicas N"):
            alone(0)
    # What that says works: --min-replicas 0 alone was refused, its most replicas being --replicas, 0.
    zero = ScaleConfig(0, min_replicas=0, max_replicas=2).deployment_options()["autoscaling_config"]
    assert (zero["min_replicas"], zero["max_replicas"]) == (0, 2)
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
