"""Error mapping, tokens, retries and routing against in-process fake
servers (grpcio servers implementing the paramd service), no daemon."""

import time

import grpc
import numpy as np
import pytest

import paramd
from conftest import reserve_ports
from paramd.errors import StatusCode, from_status


@pytest.mark.parametrize(
    "code,message,reason,cls,builtin",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "unknown parameter 'x'", "invalid", paramd.InvalidArgument, ValueError),
        (grpc.StatusCode.NOT_FOUND, "job 'j' does not exist", "unknown_job", paramd.NotFound, LookupError),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "stale push: round 3 of job 'j' is complete; the current round is 5",
            "stale",
            paramd.StalePush,
            paramd.FailedPrecondition,
        ),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "early push: job 'j' is collecting round 2, not round 4",
            "early",
            paramd.EarlyPush,
            paramd.FailedPrecondition,
        ),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "job 'j' already exists with a different configuration: workers 2 != 4",
            "job_mismatch",
            paramd.JobMismatch,
            paramd.FailedPrecondition,
        ),
        # The class comes from the reason, never from the message's text.
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "stale push: looks like one",
            None,
            paramd.FailedPrecondition,
            paramd.Error,
        ),
        (grpc.StatusCode.FAILED_PRECONDITION, "a refusal", "stale", paramd.StalePush, paramd.FailedPrecondition),
        # A reason that does not fit the code does not change the class.
        (grpc.StatusCode.NOT_FOUND, "job 'j' does not exist", "stale", paramd.NotFound, LookupError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "round 9 not complete", "timeout", paramd.DeadlineExceeded, TimeoutError),
        (grpc.StatusCode.UNAVAILABLE, "restoring checkpoints", "unavailable", paramd.Unavailable, ConnectionError),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "push: more than 10 bytes",
            "too_large",
            paramd.ResourceExhausted,
            paramd.Error,
        ),
        (grpc.StatusCode.UNAUTHENTICATED, "bad token", None, paramd.Unauthenticated, PermissionError),
        (grpc.StatusCode.INTERNAL, "disk full", "internal", paramd.Internal, paramd.Error),
        (grpc.StatusCode.UNKNOWN, "what", None, paramd.Error, RuntimeError),
    ],
)
def test_status_codes_and_reasons_map_to_exceptions_with_the_servers_message(code, message, reason, cls, builtin):
    e = from_status(code.value[0], message, reason=reason)
    assert type(e) is cls
    assert isinstance(e, builtin) and isinstance(e, paramd.Error)
    assert e.code == StatusCode(code.value[0]) and e.message == message and e.reason == reason
    assert message in str(e) and code.name in str(e)


def test_errors_of_a_real_call_carry_the_servers_message(fakes):
    shards, urls = fakes
    shards[0].fail = (grpc.StatusCode.INVALID_ARGUMENT, "optimizer.lr must be >= 0, got -1")
    with paramd.Client(urls[0], retries=0) as c:
        with pytest.raises(paramd.InvalidArgument) as e:
            c.status("j")
    assert e.value.message == "optimizer.lr must be >= 0, got -1"
    assert e.value.shard is None


def test_an_error_of_one_shard_names_it_and_the_others_still_get_their_part(fakes):
    shards, urls = fakes
    shards[1].fail = (
        grpc.StatusCode.FAILED_PRECONDITION,
        "stale push: round 0 of job 'j' is complete; the current round is 1",
        "stale",
    )
    with paramd.Client(urls[0], retries=0) as c:
        with pytest.raises(paramd.StalePush) as e:
            c.push("j", 0, 0, {"w": np.zeros((2, 5), np.float32), "b": np.zeros(3, np.float32)})
    assert e.value.shard == 1 and e.value.url == urls[1] and e.value.reason == "stale"
    assert "shard 1 at %s" % urls[1] in str(e.value)
    assert len(shards[0].pushes) == 1 and len(shards[2].pushes) == 1


def test_pushes_reach_each_shard_with_its_chunks_and_pulls_reassemble(fakes):
    shards, urls = fakes
    w = np.arange(10, dtype=np.float32).reshape(2, 5)
    b = np.array([-1, -2, -3], np.float32)
    with paramd.Client(urls[0]) as c:
        r = c.push("j", 3, 7, {"w": w, "b": b})
        assert r == paramd.PushResult(duplicate=False, pushed=1)
        got = {i: sorted(s.pushes[0][2]) for i, s in enumerate(shards)}
        # A header-only first message: admitted before any payload.
        assert all(len(s.first_messages[0].grads) == 0 for s in shards)
        assert all(s.pushes[0][:2] == (3, 7) for s in shards)
        assert got[0] == [("w", 4, [4.0, 5.0, 6.0, 7.0])]
        assert got[1] == [("w", 8, [8.0, 9.0])]
        assert got[2] == [("b", 0, [-1.0, -2.0, -3.0]), ("w", 0, [0.0, 1.0, 2.0, 3.0])]
        pulled = c.pull("j", 8)
    assert pulled.round == 8 and list(pulled.last.lr) == [0.5]
    np.testing.assert_array_equal(pulled.params["w"], w)
    np.testing.assert_array_equal(pulled.params["b"], b)
    # The layout was fetched once, from the coordinator.
    assert shards[0].calls == 1 + 2 and shards[1].calls == 2


def test_a_pull_answered_from_different_rounds_is_repeated_at_the_newest(fakes):
    # Training went on while the shards were read: shard 1 has completed
    # round 5 already. Its values are not mixed with the others' round 3.
    shards, urls = fakes
    shards[1].at_least = 5
    with paramd.Client(urls[0]) as c:
        c.push("j", 0, 0, {"w": np.ones((2, 5), np.float32), "b": np.ones(3, np.float32)})
        pulled = c.pull("j", 3)
    assert pulled.round == 5 and pulled.last.round == 4
    assert [s.pulled for s in shards] == [[3, 5], [3, 5], [3, 5]]


def test_the_token_is_sent_to_every_shard(fakes):
    shards, urls = fakes
    with paramd.Client(urls[0], token="s3cret") as c:
        c.push("j", 0, 0, {"w": np.zeros((2, 5), np.float32), "b": np.zeros(3, np.float32)})
    for s in shards:
        assert s.metadata and all(m.get("authorization") == "Bearer s3cret" for m in s.metadata)


def test_unavailable_is_retried_and_a_retried_push_is_sent_whole(fakes):
    shards, urls = fakes
    shards[2].unavailable = 2
    with paramd.Client(urls[0], retries=3) as c:
        c.push("j", 1, 0, {"w": np.ones((2, 5), np.float32), "b": np.ones(3, np.float32)})
    assert len(shards[2].pushes) == 1
    assert sorted(p for p, _, _ in shards[2].pushes[0][2]) == ["b", "w"]
    shards[0].unavailable = 5
    with paramd.Client(urls[0], retries=1) as c:
        with pytest.raises(paramd.Unavailable, match="starting up"):
            c.status("j")


def test_an_unreachable_server_is_tried_until_the_deadline_or_the_retries_run_out():
    (port,) = reserve_ports(1)
    url = "http://127.0.0.1:%d" % port
    # Pauses of 50, 100, 200 and 400 ms fit in one second.
    for kw, least, most in [({"timeout": 1}, 0.7, 5.0), ({"timeout": 30, "retries": 0}, 0.0, 5.0)]:
        start = time.monotonic()
        with paramd.Client(url, **kw) as c:
            with pytest.raises(paramd.Unavailable):
                c.status()
        took = time.monotonic() - start
        assert least <= took <= most, "%r: gave up after %.2f s" % (kw, took)


def test_aborted_pushes_are_sent_again_and_other_calls_are_not_retried(fakes):
    shards, urls = fakes
    shards[1].aborted = 3
    with paramd.Client(urls[0], retries=0) as c:
        r = c.push("j", 1, 0, {"w": np.ones((2, 5), np.float32), "b": np.ones(3, np.float32)})
        assert r == paramd.PushResult(duplicate=False, pushed=1)
        assert shards[1].calls == 4 and len(shards[1].pushes) == 1
        shards[0].fail = (grpc.StatusCode.ABORTED, "state moved")
        with pytest.raises(paramd.Aborted, match="state moved"):
            c.status("j")
        assert shards[0].calls == 1 + 1 + 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"url": ""}, "url must be a non-empty string"),
        ({"url": "ftp://h:1"}, "scheme must be http or https"),
        ({"url": "http://host"}, "must name a host and a port"),
        ({"url": "http://h:1", "timeout": 0}, "timeout must be > 0"),
        ({"url": "http://h:1", "retries": -1}, "retries must be None or an integer >= 0"),
        ({"url": "https://h:1", "tls": "/nonexistent/ca.pem"}, "TLS ca_cert: cannot read '/nonexistent/ca.pem'"),
        ({"url": "https://h:1", "tls": False}, "is https:// but tls=False"),
    ],
)
def test_client_arguments_are_checked(kwargs, match):
    with pytest.raises(paramd.InvalidArgument, match=match):
        paramd.Client(**kwargs)
