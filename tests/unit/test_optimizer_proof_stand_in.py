"""The coordinator's optimizer proof in a process that has not imported ``torch._dynamo``: it
proves and refuses as torch does, imports no ``torch._dynamo`` on success, and leaves torch as it
was (a later real import and optimizer work). A fresh interpreter each, since this one may have
imported ``torch._dynamo`` already."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import math, sys
    import torch
    from lepton.errors import ConfigError
    from lepton.optimizers import prove_optimizer

    params = [("w", torch.randn(8, 4)), ("b", torch.randn(8))]
    for name, kwargs, schedule, schedule_kwargs in [
        ("adam", {}, "constant", {}), ("sgd", {"momentum": 0.9}, "cosine", {"t_max": 10}),
        ("adamw", {"weight_decay": 0.1}, "step", {"step_size": 2}), ("adafactor", {}, "constant", {}),
        ("rprop", {}, "constant", {}), ("asgd", {}, "constant", {}), ("nadam", {}, "constant", {}),
    ]:
        prove_optimizer(params, frozenset(), name, 0.01, kwargs, schedule, schedule_kwargs)
    print("after-proofs", "torch._dynamo" in sys.modules)
    for name, lr, kwargs in [("adam", 0.01, {"betas": [0.9, 0.99, 0.9]}), ("adam", math.inf, {}),
                             ("sparseadam", 0.01, {})]:
        try:
            prove_optimizer(params, frozenset(), name, lr, kwargs)
        except ConfigError as exc:
            print("refused", exc)
    import torch._dynamo
    print("real", torch._dynamo.__file__ is not None, hasattr(torch._dynamo, "optimize"))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    raw = torch.optim.Optimizer.add_param_group.__wrapped__
    print("cached-by-real", raw.__dict__["__dynamo_disable"].__module__)
    """
)


def test_the_proof_needs_no_dynamo_refuses_in_torchs_words_and_leaves_torch_as_it_was():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "after-proofs False", done.stdout
    refused = [line for line in lines if line.startswith("refused")]
    assert len(refused) == 3, done.stdout
    assert "fails its first step: ValueError: too many values to unpack" in refused[0]
    assert "non-finite" in refused[1]
    assert "SparseAdam does not support dense gradients" in refused[2]
    assert "real True True" in lines, done.stdout
    assert any(line.startswith("cached-by-real torch._dynamo") for line in lines), done.stdout


FALLBACK = textwrap.dedent(
    """
    import sys
    import torch
    from lepton.optimizers import prove_optimizer

    class Compiled(torch.optim.SGD):  # reads more of torch._dynamo than the stand-in has
        def step(self, closure=None):
            import torch._dynamo
            torch._dynamo.is_compiling()
            return super().step(closure)

    torch.optim.Compiled = Compiled
    prove_optimizer([("w", torch.randn(3, 2))], frozenset(), "compiled", 0.01, {})
    print("proved", "torch._dynamo" in sys.modules, hasattr(sys.modules["torch._dynamo"], "optimize"))
    """
)


def test_a_proof_the_stand_in_cannot_run_is_decided_by_torch_with_the_real_import():
    done = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "proved True True", done.stdout
