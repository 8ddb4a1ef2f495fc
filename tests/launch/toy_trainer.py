"""A stand-in trainer for the launch glue: ranks found the way spin-mega finds them, a gloo all_reduce per
"step", and the trainer's preemption contract (on SIGUSR1/SIGTERM: save at the next step boundary, exit
75; on start: resume from the saved state). Its results depend only on the step count, so an interrupted
and resumed run must end exactly like an uninterrupted one."""

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path


def main() -> int:
    import torch
    import torch.distributed as dist

    from spin_mega.parallel.distributed import detect_launch_env

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    args = parser.parse_args()

    requested = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda num, frame: requested.append(num))

    launch = detect_launch_env()
    dist.init_process_group("gloo", init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                            rank=launch.rank, world_size=launch.world_size)
    work = Path(args.workdir)
    state_path = work / "toy_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"step": 0, "total": 0.0}
    hosts = [None] * launch.world_size
    dist.all_gather_object(hosts, {"rank": launch.rank, "node": os.environ.get("SLURMD_NODENAME"),
                                   "source": launch.source, "master": f"{launch.master_addr}:{launch.master_port}"})
    if launch.rank == 0:
        with open(work / "toy_ranks.jsonl", "a") as handle:
            handle.write(json.dumps(hosts) + "\n")

    while state["step"] < args.steps:
        step = state["step"] + 1
        value = torch.tensor([float((launch.rank + 1) * step)])
        dist.all_reduce(value)
        state = {"step": step, "total": state["total"] + value.item()}
        if launch.rank == 0:
            with open(work / "toy_metrics.jsonl", "a") as handle:
                handle.write(json.dumps({"step": step, "sum": value.item(), "total": state["total"]}) + "\n")
        time.sleep(args.step_seconds)
        # Signals reach the ranks at different moments: agree on stopping, at the same step.
        stop = torch.tensor([1.0 if requested else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() and state["step"] < args.steps:
            if launch.rank == 0:
                tmp = state_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(state))
                os.replace(tmp, state_path)
            dist.barrier()
            dist.destroy_process_group()
            print(f"rank {launch.rank} on {socket.gethostname()}: checkpointed at step {step}, exiting 75", flush=True)
            return 75
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
