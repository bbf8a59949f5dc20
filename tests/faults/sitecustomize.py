"""Fault injection for tests/test_elastic.py: on this directory's PYTHONPATH, a torchrun worker whose rank matches
SPARSETRAIN_FAULT="<rank>:<step>:<action>" acts after its optimizer step <step>, in its first attempt only:

- kill: SIGKILL itself (a crashed or OOM-killed rank)
- stop: SIGSTOP itself (a frozen rank)
- term: SIGTERM itself (preemption that reaches this rank only)
- mark: create the file SPARSETRAIN_FAULT_MARK, then slow down (1 s a step) so a signal sent on seeing the file
  lands mid-run

Every other process (the launcher, torchrun, other ranks, restarted workers) is left alone.
"""

import os


def _install() -> None:
    spec, rank = os.environ.get("SPARSETRAIN_FAULT"), os.environ.get("RANK")
    if not spec or rank is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    fault_rank, fault_step, action = spec.split(":")
    if int(rank) != int(fault_rank):
        return
    import signal
    import time

    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = [0]

    def hook(optimizer, args, kwargs) -> None:  # noqa: ANN001
        steps[0] += 1
        if steps[0] < int(fault_step):
            return
        if action == "kill" and steps[0] == int(fault_step):
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop" and steps[0] == int(fault_step):
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action == "term" and steps[0] == int(fault_step):
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "mark":
            with open(os.environ["SPARSETRAIN_FAULT_MARK"], "a"):
                pass
            time.sleep(1.0)

    register_optimizer_step_post_hook(hook)


_install()
