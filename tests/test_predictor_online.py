"""Online learning: bounded store, live error, and a hot swap that only happens on measured improvement."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sloproxy.predictor.columns import N_COLUMNS
from sloproxy.predictor.data import holdout_ids, load_lengths
from sloproxy.predictor.online import OnlineLearner, SampleStore
from sloproxy.predictor.retrain import read_payload, write_payload
from sloproxy.predictor.serving import LengthPredictor
from sloproxy.predictor.train import TrainConfig, fit

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lengths"


@pytest.fixture(scope="module")
def data():
    rows = load_lengths(DATA / "alpaca_eval_prompts.jsonl", DATA / "alpaca_eval_lengths.csv")
    train_ids = holdout_ids(rows.prompt_ids, 0.1, seed=5)
    bundle = fit(rows.subset_prompts(train_ids), TrainConfig(seed=1, rounds=20, folds=3, num_threads=1))
    live = rows.subset_prompts(set(rows.prompt_ids) - train_ids)
    order = np.random.default_rng(0).permutation(len(live))[:1500]
    traffic = [(live.texts[live.prompt[i]], live.model[i], int(live.output_tokens[i])) for i in order]
    return bundle, traffic


def _learner(bundle, **kw) -> OnlineLearner:
    return OnlineLearner(
        LengthPredictor(bundle), min_samples=100, rounds=20, executor=ThreadPoolExecutor(1), interval_s=None, **kw
    )


def _feed(learner: OnlineLearner, traffic, scale_until: int = 0, scale: float = 1.0) -> None:
    for i, (text, model, tokens) in enumerate(traffic):
        pred = learner.predict_request(text, model, None)
        learner.record(pred, int(tokens * scale) if i < scale_until else tokens)


def test_store_is_bounded_and_wraps_in_time_order() -> None:
    store = SampleStore(capacity=3, ncol=2)
    assert len(store) == 0 and store.snapshot()[0].shape == (0, 2)
    store.append([0.0, 0.5], 0)
    store.append([1.0, 1.5], 1)
    x, y = store.snapshot()
    assert x.tolist() == [[0.0, 0.5], [1.0, 1.5]] and y.tolist() == [0, 1]  # not yet full
    for i in range(2, 10):
        store.append([float(i), i + 0.5], i)
    assert len(store) == 3 and store.added == 10
    x, y = store.snapshot()
    assert y.tolist() == [7, 8, 9] and x[:, 0].tolist() == [7.0, 8.0, 9.0]  # oldest first across the wrap
    assert x.dtype == np.float32 and x.flags.c_contiguous
    x[0, 0] = -1.0
    assert store.snapshot()[0][0, 0] == 7.0  # a copy: the live ring is untouched


def test_retrain_payload_round_trips(tmp_path: Path, data) -> None:
    bundle, _ = data
    x = np.arange(6 * N_COLUMNS, dtype=np.float32).reshape(6, N_COLUMNS)
    y = np.array([1, 2, 3, 400, 5, 6], dtype=np.int64)
    payload = write_payload(tmp_path, x, y, bundle, {"holdback": 0.2, "rounds": 3})
    assert payload["holdback"] == 0.2 and payload["offset90"] == bundle.offset90
    x2, y2, p50, p90 = read_payload(payload)
    assert np.array_equal(x2, x) and x2.dtype == np.float32 and np.array_equal(y2, y)
    rows = x.astype(np.float64)
    assert np.array_equal(p50.predict(rows), bundle.p50.predict(rows))
    assert np.array_equal(p90.predict(rows), bundle.p90.predict(rows))


async def test_accepts_a_better_model(data) -> None:
    bundle, traffic = data
    skewed = dataclasses.replace(bundle, offset50=bundle.offset50 + 1.5, offset90=bundle.offset90 + 1.5)
    learner = _learner(skewed)
    _feed(learner, traffic)
    before = learner.predictor
    assert learner.due() is False  # retrain_every (5000) not reached, no schedule
    result = await learner.retrain_now()
    assert result["accepted"] and result["candidate_loss"] < result["current_loss"]
    assert learner.predictor is not before
    assert learner.predictor.bundle.offset50 == result["offset50"]
    assert learner.predictor.predict("Write a poem.", traffic[0][1]) != before.predict("Write a poem.", traffic[0][1])
    m = learner.metrics()
    assert m["swaps_total"] == 1 and m["model_generation"] == 1 and m["live_samples"] == 0  # reset on swap
    await learner.stop()


async def test_refuses_a_worse_model(data) -> None:
    bundle, traffic = data
    learner = _learner(bundle)
    # the older 80% of the samples carry 30x inflated lengths (a broken usage parser, say); the newest are true
    _feed(learner, traffic, scale_until=int(0.8 * len(traffic)), scale=30.0)
    before = learner.predictor
    result = await learner.retrain_now()
    assert not result["accepted"] and result["candidate_loss"] > result["current_loss"]
    assert learner.predictor is before
    m = learner.metrics()
    assert m["rejected_total"] == 1 and m["swaps_total"] == 0 and m["model_generation"] == 0
    assert m["live_samples"] == len(traffic) and 0.0 <= m["live_p90_coverage"] <= 1.0
    await learner.stop()


async def test_replicas_serve_the_model_their_trainer_published(data, redis_server) -> None:
    """Several replicas (state in Redis): the lease holder retrains and publishes; the others adopt it."""
    from sloproxy.config import StateConfig
    from sloproxy.predictor.online import TRAINER_ROLE
    from sloproxy.state.redis_state import RedisCoordinator

    bundle, traffic = data
    config = StateConfig(backend="redis", url=redis_server.url, namespace="online-test", lease_s=2.0)
    skewed = dataclasses.replace(bundle, offset50=bundle.offset50 + 1.5, offset90=bundle.offset90 + 1.5)
    trainer, follower = _learner(skewed), _learner(skewed)
    coordinators = [RedisCoordinator(config, []) for _ in range(2)]
    for learner, coordinator in zip((trainer, follower), coordinators, strict=True):
        learner.exchange, learner.replica = coordinator, coordinator.replica_id
    try:
        assert await coordinators[0].try_lead(TRAINER_ROLE) and not await coordinators[1].try_lead(TRAINER_ROLE)
        assert await follower.adopt_shared() is False  # nothing published yet: it keeps its own model
        _feed(trainer, traffic)
        assert (await trainer.retrain_now())["accepted"]
        assert trainer.version is not None
        assert await follower.adopt_shared() is True
        assert follower.version == trainer.version and follower.metrics()["adopted_total"] == 1
        ours, theirs = follower.predictor.bundle, trainer.predictor.bundle
        assert (ours.offset50, ours.offset90) == (theirs.offset50, theirs.offset90)
        prompt = "Write a poem about the sea."
        assert follower.predictor.predict(prompt, traffic[0][1]) == trainer.predictor.predict(prompt, traffic[0][1])
        assert await follower.adopt_shared() is False  # already serving it
    finally:
        for learner in (trainer, follower):
            await learner.stop()
        for coordinator in coordinators:
            await coordinator.stop()
