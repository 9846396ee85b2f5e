"""The sync equivalence suites again, with every worker pushing during backward (worker/overlap.py).

Each test below runs one of the suites' own tests (test_equivalence.py, test_model_equivalence.py,
test_training_loop_equivalence.py: real sync parameter servers on 127.0.0.1:0 against one torch
process) with the suite's ``Worker`` replaced by one whose step arms ``BackwardPush`` around the
same gradient computation and settles with ``InFlight.finish``, as the worker's agent does. The
tolerances are the suites' own. Each overlapped step also asserts that the pushes it expects to
begin during backward did (a worker quietly pushing after backward would prove nothing), and the
training-loop cases that ``worker.overlap.blocker`` turns off (accumulation, clipping) check that
the agent's decision is indeed to push after backward.
"""

from __future__ import annotations

import pytest

from worker.overlap import BackwardPush, for_trainer

from . import test_equivalence as eq
from . import test_model_equivalence as model_eq
from . import test_training_loop_equivalence as loop_eq

servers = eq.servers  # the suites' fixtures
cluster = model_eq.cluster


class PlainWorker(eq.Worker):
    """test_equivalence.py's worker (a plain torch model), pushing during backward."""

    def __init__(self, index, shards) -> None:
        super().__init__(index, shards)
        self.backward_push = BackwardPush(self.servers, dict(self.model.named_parameters()), {})

    def close(self) -> None:
        self.backward_push.close()
        super().close()

    def step(self, step: int) -> None:
        assert self.version == step, f"{self.member} computes step {step} from version {self.version}"
        x, y = eq.batch(step, self.index)
        _, grads, in_flight = self.backward_push.gradients(
            lambda: (0.0, eq.mean_loss_gradients(self.model, x, y)),
            eq.BATCH_SIZES[self.index], f"{self.member}-{step}", eq.CALL_TIMEOUT_S,
        )
        replies = in_flight.finish(grads)
        # every server holds a parameter that gets a gradient: all start during backward
        assert sorted(in_flight.during_backward) == sorted(replies)
        for reply in replies.values():
            assert reply.applied and reply.version == step + 1, f"{self.member} step {step}: {reply}"
        self._agreed()


@pytest.mark.parametrize("servers", eq.COMBINATIONS, indirect=True)
def test_overlapped_sync_training_equals_torch_on_the_union_of_batches(
    servers, request, record_property, monkeypatch
):
    monkeypatch.setattr(eq, "Worker", PlainWorker)
    eq.test_sync_training_through_parameter_servers_equals_torch_on_the_union_of_batches(
        servers, request, record_property
    )


class TrainerWorker(model_eq.Worker):
    """test_model_equivalence.py's worker (Trainer.gradients), pushing during backward."""

    def __init__(self, index, spec, served) -> None:
        super().__init__(index, spec, served)
        backward_push = for_trainer(self.trainer, self.servers)
        assert backward_push is not None, "the agent would not overlap this job"
        self.backward_push = backward_push

    def close(self) -> None:
        self.backward_push.close()
        super().close()

    def step(self, step: int) -> None:
        indices = model_eq.batch_indices(step, self.index)
        samples = model_eq.BATCH_SIZES[self.index]
        _, grads, in_flight = self.backward_push.gradients(
            lambda: self.trainer.gradients(indices), samples, f"{self.member}-{step}", model_eq.CALL_TIMEOUT_S
        )
        assert grads is not None
        self.pushed[step] = {n: g.clone() for n, g in grads.items()}
        replies = in_flight.finish(grads)
        assert in_flight.during_backward, "no push began during backward"
        for server_id, reply in replies.items():
            version = self.servers.versions[server_id]
            assert reply.applied and version == step + 1, f"{self.member} step {step}: {reply}"


@pytest.mark.parametrize(
    "cluster",
    [pytest.param((model_eq.MODELS[m], o), id=f"{m}-{o}") for m in model_eq.MODELS for o in model_eq.OPTIMIZERS]
    + [pytest.param(("integration.custom_workload:batchnorm_mlp", "sgd-momentum-wd"), id="batchnorm")],
    indirect=True,
)
def test_overlapped_sync_training_of_a_users_model_equals_torch_optim(cluster, monkeypatch):
    monkeypatch.setattr(model_eq, "Worker", TrainerWorker)
    spec, _ = cluster
    if "batchnorm" in spec.model:
        model_eq.test_batchnorm_running_statistics_move_by_the_weighted_mean_of_the_workers_changes(cluster)
    else:
        model_eq.test_sync_training_of_a_users_model_equals_torch_optim(cluster)


class LoopWorker(loop_eq.Worker):
    """test_training_loop_equivalence.py's worker, pushing during backward where the agent would."""

    def __init__(self, index, case, layout) -> None:
        super().__init__(index, case, layout)
        self.backward_push = for_trainer(self.trainer, self.servers)
        assert (self.backward_push is None) == bool(case.accumulate > 1 or case.clip > 0), case

    def step(self, step: int) -> None:
        if self.backward_push is None:
            return super().step(step)
        indices = loop_eq.step_indices(self.case, step, self.index)
        _, grads, in_flight = self.backward_push.gradients(
            lambda: self.trainer.gradients(indices), len(indices), f"{self.member}-{step}", loop_eq.CALL_TIMEOUT_S
        )
        assert grads is not None
        replies = in_flight.finish(grads)
        assert in_flight.during_backward, "no push began during backward"
        for server_id, reply in replies.items():
            assert reply.applied and self.servers.versions[server_id] == step + 1, f"{self.member} step {step}"


@pytest.mark.parametrize("name", list(loop_eq.CASES))
def test_overlapped_sync_training_loop_features_equal_single_process_torch(name, monkeypatch):
    monkeypatch.setattr(loop_eq, "Worker", LoopWorker)
    loop_eq.test_sync_training_loop_features_equal_single_process_torch(name)
