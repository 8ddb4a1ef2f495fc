"""`spin-mega ARGS` with one gradient made infinite after the gradients of optimizer step STEP are prepared:

    python inf_grad_launcher.py STEP ARGS...

The fault is written into the real megatron-core optimizer's main gradient (what its get_grad_norm reads), so
the loss of that step stays finite and only the gradient norm can tell: what a single overflowing gradient
element does on a GPU."""

from __future__ import annotations

import math
import sys


def main() -> None:
    step, argv = int(sys.argv[1]), sys.argv[2:]
    import spin_mega.training.trainer as trainer

    build_optimizer = trainer.build_optimizer

    def build_with_fault(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)
        prepare_grads, calls = optimizer.prepare_grads, []

        def prepare_then_poison():
            found_inf = prepare_grads()
            calls.append(1)
            if len(calls) == step:
                for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
                    grads = [p.grad for group in inner.optimizer.param_groups for p in group["params"] if p.grad is not None]
                    if grads:
                        grads[0].view(-1)[0] = math.inf
                        break
            return found_inf

        optimizer.prepare_grads = prepare_then_poison
        return optimizer

    trainer.build_optimizer = build_with_fault
    from spin_mega.cli import main as cli_main

    cli_main(argv)


if __name__ == "__main__":
    main()
