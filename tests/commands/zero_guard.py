"""Run by test_deepspeed.py under `torch.distributed.run` with an accelerate DeepSpeed environment: the loop's
non-finite guard with a loss that turns NaN at given steps. Prints one JSON line (main process)."""

import json
import math
import sys
from pathlib import Path

import torch

from llmkit.train.loop import TrainingError
from llmkit.train.objectives import CausalLM, unwrap
from tests.unit.test_loop import make_trainer


class PoisonAt(CausalLM):
    """NaN loss at the given (1-based) steps; two micro-batches a step on each of the two processes."""

    def __init__(self, steps: set[int]) -> None:
        super().__init__()
        self.steps, self.calls = steps, 0

    def __call__(self, model, batch):
        loss, metrics = super().__call__(model, batch)
        training = unwrap(model).training  # the engine's own flag stays True in evaluation
        if training:
            self.calls += 1
        return (loss * math.nan if training and (self.calls + 1) // 2 in self.steps else loss), metrics


def main(out: Path) -> None:
    skip = make_trainer(out / "skip", PoisonAt({2, 4}), on_nonfinite="skip", max_nonfinite_skips=2, batch_size=8)
    result = {"skip": {"steps": skip.run().step, "skipped": skip.state.nonfinite_skips}}
    stop = make_trainer(out / "stop", PoisonAt({5}), batch_size=8)
    before: dict[str, torch.Tensor] = {}
    step = stop._step

    def remember_then_step() -> int:
        if stop.state.step == 4:
            before.update({k: v.clone() for k, v in stop.model.state_dict().items()})
        return step()

    stop._step = remember_then_step
    try:
        stop.run()
        result["stop"] = "finished"
    except TrainingError as error:
        result["stop"] = str(error)
    after = stop.model.state_dict()
    result["untouched"] = bool(before) and all(torch.equal(before[k], after[k]) for k in before)
    if stop.runtime.is_main:
        print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
