"""Reply-length estimates on the request path, and what each finished request teaches the
online learner.

Every request is predicted from its prompt (features, two boosted-tree heads: ~0.1 ms of CPU),
but not on its first-chunk path:

* on arrival, :meth:`LengthEstimates.prior` sets a table lookup: the model's median and p90
  reply (exact when ``ignore_eos`` fixes the length). A request whose model has nothing waiting
  is admitted and routed with it at once: there is no queue for its order to matter in.
* the scheduler calls :meth:`predict` for a request that must wait, before it joins the queue
  (order, KV admission and shedding read the prediction; its cost hides in the wait), and for a
  request placed on arrival once its engine work is under way (its KV reservation is then
  corrected to the prediction).

One object does it for the live proxy and the simulator alike, so a policy sees the same
estimates in both. Without a predictor the estimate stays the request's own guess
(``min(max_tokens, 256)``); an oracle (simulation only) may set the true length instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .config import PredictorConfig
from .request import ProxyRequest

if TYPE_CHECKING:
    from .predictor.online import OnlineLearner

log = logging.getLogger("sloproxy.estimates")


class LengthEstimates:
    def __init__(self, learner: OnlineLearner | None, *, online: bool = False) -> None:
        self.learner = learner
        self.online = online and learner is not None

    @classmethod
    def from_config(cls, config: PredictorConfig, policy_uses_predictions: bool) -> LengthEstimates:
        """Load the configured model (the packaged one by default) when predictions are wanted."""
        wanted = config.mode == "on" or (config.mode == "auto" and policy_uses_predictions)
        if not wanted:
            return cls(None)
        from .predictor.online import OnlineLearner
        from .predictor.serving import LengthPredictor

        predictor = LengthPredictor.load(config.model)
        learner = OnlineLearner(
            predictor,
            capacity=config.store_capacity,
            retrain_every=config.retrain_every,
            interval_s=config.retrain_interval_s,
            min_samples=config.min_samples,
        )
        log.info("length predictor loaded from %s", predictor.source)
        return cls(learner, online=config.online)

    @property
    def enabled(self) -> bool:
        return self.learner is not None

    def start(self) -> None:
        if self.online and self.learner is not None:
            self.learner.start()

    async def stop(self) -> None:
        if self.learner is not None:
            await self.learner.stop()

    def prior(self, request: ProxyRequest) -> None:
        """On arrival: the model's median and p90 reply (capped by the client's limit), or the exact
        length when ``ignore_eos`` fixes it. A lookup, so a request placed at once pays no model."""
        if self.learner is None:
            return
        if request.ignore_eos and request.max_tokens is not None:  # its length is known: no model needed
            self.predict_many([request])
            return
        p50, p90 = self.learner.predictor.prior(request.model)
        limit = request.max_tokens
        if limit is not None and limit > 0:
            p50, p90 = min(p50, float(limit)), min(p90, float(limit))
        request.pred_p50, request.pred_p90 = p50, p90
        request.est_output_tokens = max(1, round(p50))
        request.estimate_source = "prior"

    def predict(self, request: ProxyRequest) -> None:
        """Predict from the prompt unless done (or the length is known); the deadline moves with it."""
        self.predict_many([request])

    def predict_many(self, requests: Sequence[ProxyRequest]) -> None:
        """:meth:`predict` for several requests in one pass of the model (the scheduler batches the
        predictions nobody waits on; see fastpredict.py for why a batch is cheaper per request)."""
        learner = self.learner
        if learner is None:
            return
        todo = []
        for request in requests:
            if request.prediction is not None or request.estimate_source == "exact":
                continue
            if request.ignore_eos and request.max_tokens is not None:  # its length is known: no model needed
                request.pred_p50 = request.pred_p90 = float(request.max_tokens)
                request.est_output_tokens = request.max_tokens
                request.estimate_source = "exact"
            else:
                todo.append(request)
        if not todo:
            return
        calls = [(r.prompt, r.model, r.max_tokens, r.temperature, None, None, r.est_prompt_tokens) for r in todo]
        for request, prediction in zip(todo, learner.predict_many(calls), strict=True):
            request.prediction = prediction
            request.pred_p50, request.pred_p90 = prediction.p50, prediction.p90
            request.est_output_tokens = max(1, round(prediction.p50))
            request.estimate_source = "model"
            if request.slo is not None:
                request.classify(request.tenant, request.slo, request.band)  # deadlines follow the estimate

    def finished(self, request: ProxyRequest) -> None:
        """A reply ended: its true length (from the engine's usage) is a training sample, unless the
        client's limit cut it (then the natural length is unknown) or the client left early."""
        if not self.online or self.learner is None or request.prediction is None:
            return
        tokens = request.completion_tokens
        if tokens is None or request.disconnected:
            return
        if request.max_tokens is not None and tokens >= request.max_tokens:
            return
        self.learner.record(request.prediction, tokens)

    def metrics(self) -> dict[str, float]:
        return self.learner.metrics() if self.learner is not None else {}
