"""Run by test_deepspeed.py under `torch.distributed.run` with an accelerate DeepSpeed environment: the loop's
non-finite guard with a loss that turns NaN at given steps (batch 8: two micro-batches a step on each of two
processes, as test_loop's single process has). Prints one JSON line (main process)."""

import json
import sys
from pathlib import Path

import torch

from llmkit.train.loop import TrainingError
from tests.unit.test_loop import PoisonAt, make_trainer


def main(out: Path) -> None:
    skip = make_trainer(out / "skip", PoisonAt({2, 4}), on_nonfinite="skip", max_nonfinite_skips=2, batch_size=8)
    result = {"skip": {"steps": skip.run().step, "skipped": skip.state.nonfinite_skips}}
    stop = make_trainer(out / "stop", PoisonAt({5}), batch_size=8)
    before: dict[str, torch.Tensor] = {}
    step = stop._step

    def remember_then_step() -> tuple[int, float]:
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
