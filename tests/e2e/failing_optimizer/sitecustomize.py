"""Test-only: a Python process started with this directory on PYTHONPATH (every process of a
`lepton up` a test starts so) finds ``torch.optim.FailsAtThirdStep``, SGD that raises at its
instance's third step: the coordinator's proof step passes, a parameter server's third update
raises."""

import torch


class FailsAtThirdStep(torch.optim.SGD):
    def step(self, closure=None):
        self.steps_taken = getattr(self, "steps_taken", 0) + 1
        if self.steps_taken == 3:
            raise RuntimeError("injected failure at step 3")
        return super().step(closure)


torch.optim.FailsAtThirdStep = FailsAtThirdStep
